"""`lorakit rank`, `lorakit resize` and `lorakit info`: what an adapter holds, how much rank it uses, and a
smaller copy of it. The math lives in lorakit.lora.spectrum; this file reads options, prints and plots.

`write_rank_report(adapter_dir, run_dir)` is the same report for `lorakit train --rank-report`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import AdapterError, ConfigError
from .args import add_options, build_config
from .commands import recorded_base_model
from .main import command

REPORT_NAME = "rank_report.json"
PLOT_NAME = "rank_spectrum.png"
FLOOR = 1e-8  # normalized singular values below this are drawn at it (log axis)


def _positional(parser: argparse.ArgumentParser, options: type) -> None:
    """The positional ADAPTER plus one --option per field of the options dataclass."""
    parser.add_argument("adapter_pos", nargs="?", metavar="ADAPTER", help="adapter folder")
    add_options(parser, options)


def _options(cls: type, args: argparse.Namespace, where: str):
    """The options dataclass from YAML + command line, with the positional ADAPTER taking precedence."""
    if getattr(args, "adapter_pos", None):
        args.adapter = args.adapter_pos
    opts = build_config(cls, args)
    if not opts.adapter:
        raise ConfigError([f"give the adapter folder: lorakit {where} ADAPTER"], where=where)
    return opts


def _spectra(adapter: str, allow_pickle: bool = False):
    """One LayerSpectrum per adapted layer of the adapter folder."""
    from ..config import LoraConfig
    from ..lora.spectrum import adapter_spectra, read_adapter

    config_dict, tensors = read_adapter(adapter, allow_pickle)
    return adapter_spectra(LoraConfig.from_dict(config_dict), tensors)


# ---------------------------------------------------------------------- rank
@dataclass
class RankOptions:
    """Options of `lorakit rank`."""

    adapter: str = ""
    """Adapter folder (also accepted as the positional ADAPTER)."""
    energy: float = 0.99
    """Energy (sum of squared singular values) to keep: the suggested rank keeps this fraction of the whole
    adapter's update, the per-layer suggestions of each layer's own."""
    plot: Optional[str] = None
    """Write the spectra, grouped by layer type, to this PNG file."""
    json: bool = False
    """Print the report as JSON (suggested_rank, per-layer singular values and effective ranks)."""
    allow_pickle: bool = False
    """Read a pickle adapter (adapter_model.bin/.pt), which can run code when loaded; only if you trust it."""


@command("rank", "singular values of each layer's update, its effective ranks, and the smallest rank that "
         "keeps 99 percent of the update's energy")(lambda p: _positional(p, RankOptions))
def _rank(args: argparse.Namespace) -> None:
    from ..lora.spectrum import rank_report

    opts = _options(RankOptions, args, "rank")
    if not 0 < opts.energy <= 1:
        raise ConfigError([f"--energy must be in (0, 1], e.g. 0.99, got {opts.energy}"], where="rank")
    spectra = _spectra(opts.adapter, opts.allow_pickle)
    report = {"adapter": str(opts.adapter), **rank_report(spectra, opts.energy)}
    if opts.plot:
        plot_spectra(spectra, opts.plot, title=f"{opts.adapter}: suggested rank {report['suggested_rank']}")
    if opts.json:
        print(json.dumps(report, indent=2))
        return
    print_rank_report(report)
    if opts.plot:
        print(f"\nplot: {opts.plot}")


def print_rank_report(report: dict[str, Any]) -> None:
    """The report as tables: one row per layer, then one per layer type, then the suggestion."""
    levels = list(report["layers"][0]["effective_rank"])
    name_width = max(24, *(len(row["module"]) + 2 for row in report["layers"]))
    print(f"{'layer':<{name_width}}{'r':>4}{'sigma_1':>11}" + "".join(f"{'rank@' + p:>10}" for p in levels))
    for row in report["layers"]:
        sigma = row["singular_values"][0] if row["singular_values"] else 0.0
        print(f"{row['module']:<{name_width}}{row['r']:>4}{sigma:>11.4g}"
              + "".join(f"{row['effective_rank'][p]:>10}" for p in levels))
    energy = f"{100 * report['energy']:g}%"
    print(f"\n{'layer type':<16}{'layers':>7}{'r':>5}   rank keeping {energy}: min / median / max")
    for kind, s in report["by_kind"].items():
        ranks = f"{s['min_rank']:>4} / {s['median_rank']:>4} / {s['suggested_rank']:>4}"
        print(f"{kind:<16}{s['layers']:>7}{s['r']:>5}   {ranks}")
    rows = [row for row in report["uniform_ranks"] if len(report["uniform_ranks"]) <= 16
            or row["rank"] in (report["suggested_rank"], report["r"]) or row["rank"] & (row["rank"] - 1) == 0]
    print("\nuniform rank:      " + "".join(f"{row['rank']:>7}" for row in rows))
    print("energy kept:       " + "".join(f"{100 * row['energy_kept']:>6.1f}%" for row in rows))
    print("worst layer keeps: " + "".join(f"{100 * row['min_layer_energy_kept']:>6.1f}%" for row in rows))
    print(f"\nsuggested rank: {report['suggested_rank']} (of r={report['r']}), the smallest keeping >= {energy} of the "
          f"adapter's update energy;\nthe worst layer then keeps "
          f"{100 * report['min_layer_energy_kept_at_suggested_rank']:.1f}% of its own; "
          f"{report['lora_params_at_suggested_rank']:,} LoRA parameters instead of {report['lora_params']:,}")
    print(f"every layer keeps >= {energy} of its own energy from rank {report['suggested_rank_every_layer']}; "
          f"per-layer ranks (resize --energy {report['energy']:g}) need {report['lora_params_at_suggested_ranks']:,} "
          "parameters")
    adapter, k = report.get("adapter", "ADAPTER"), report["suggested_rank"]
    if k < report["r"]:
        print(f"resize: lorakit resize {adapter} --rank {k} --out {adapter}-r{k}")
    else:
        print(f"the update uses all r={k} directions at this energy: a smaller rank drops more "
              "(the table above shows how much); compare scores with lorakit resize --data")


def plot_spectra(spectra, path: str | os.PathLike, title: str = "") -> Path:
    """Write `spectra_figure` as a PNG (atomically)."""
    from ..atomic import atomic_write

    fig = spectra_figure(spectra, title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return Path(path)


def spectra_figure(spectra, title: str = ""):
    """Normalized singular values (σ_i / σ_1, log scale) and cumulative energy, one column per layer type;
    each line coloured by its layer number, which the colorbar names."""
    # The Agg canvas drawn directly: no display needed, and pyplot's global backend is left alone.
    from matplotlib import cm, colors, ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds: dict[str, list] = {}
    for s in spectra:
        kinds.setdefault(s.kind, []).append(s)
    depth = {s.module: _layer_index(s.module, i) for i, s in enumerate(spectra)}
    norm = colors.Normalize(min(depth.values()), max(max(depth.values()), min(depth.values()) + 1))
    mapping = cm.ScalarMappable(norm=norm, cmap="viridis")  # early layers dark
    fig = Figure(figsize=(3.2 * len(kinds) + 2, 6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(kinds), squeeze=False)
    for col, (kind, group) in enumerate(kinds.items()):
        top, bottom = axes[0][col], axes[1][col]
        for s in group:
            sv, color = s.singular_values, mapping.to_rgba(depth[s.module])
            if float(sv[0]) <= 0:
                continue  # a zero update has no spectrum
            index = range(1, sv.numel() + 1)
            top.semilogy(index, (sv / sv[0]).clamp_min(FLOOR).tolist(), color=color, lw=0.8, alpha=0.8)
            energy = (sv ** 2).cumsum(0) / (sv ** 2).sum()
            bottom.plot(index, energy.tolist(), color=color, lw=0.8, alpha=0.8)
        top.set_title(f"{kind} ({len(group)} layers)")
        bottom.set_ylim(0, 1.02)
        for level, style in ((0.9, ":"), (0.95, "-."), (0.99, "--")):
            bottom.axhline(level, color="grey", ls=style, lw=0.7)
        bottom.set_xlabel("singular value index i")
    axes[0][0].set_ylabel("σ_i / σ_1")
    axes[1][0].set_ylabel("cumulative energy (0.9 / 0.95 / 0.99)")
    fig.suptitle(title or "LoRA update spectra")
    colorbar = fig.colorbar(mapping, ax=axes.ravel().tolist(), fraction=0.04, pad=0.02)
    colorbar.set_label("layer (colour of each line)")
    colorbar.locator = ticker.MaxNLocator(integer=True)
    colorbar.update_ticks()
    return fig


def _layer_index(module: str, position: int) -> int:
    """The layer number in a module name (model.layers.11.self_attn.q_proj -> 11); else its position."""
    numbers = re.findall(r"\.(\d+)(?:\.|$)", module)
    return int(numbers[0]) if numbers else position


def write_rank_report(adapter_dir: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Write rank_report.json and rank_spectrum.png for a trained adapter into its run folder.

    Args:
        adapter_dir: the saved adapter (adapter_config.json + adapter_model.safetensors).
        run_dir: the run folder; both files go directly inside it.

    Returns:
        The path of rank_report.json (the JSON of `lorakit rank --json`).
    """
    from ..atomic import atomic_write_json
    from ..lora.spectrum import rank_report

    spectra = _spectra(str(adapter_dir))
    report = {"adapter": str(adapter_dir), **rank_report(spectra)}
    plot_spectra(spectra, Path(run_dir) / PLOT_NAME, title=f"suggested rank {report['suggested_rank']} "
                 f"(of r={report['r']}) keeps 99% of the update's energy")
    atomic_write_json(Path(run_dir) / REPORT_NAME, report)
    return Path(run_dir) / REPORT_NAME


# ---------------------------------------------------------------------- resize
@dataclass
class ResizeOptions:
    """Options of `lorakit resize`."""

    adapter: str = ""
    """Adapter folder to shrink (also accepted as the positional ADAPTER)."""
    out: str = ""
    """Folder for the smaller adapter (required; never the source folder)."""
    rank: Optional[int] = None
    """Truncate every layer to this rank (layers already smaller keep theirs)."""
    energy: Optional[float] = None
    """Give each layer the smallest rank keeping this fraction of its update's energy, e.g. 0.99
    (per-layer ranks go to rank_pattern)."""
    data: Optional[str] = None
    """Score the original and the resized adapter on this data (as `lorakit eval --data`); 'auto': what
    `lorakit eval` scores without --data (the training validation split, or the demo questions)."""
    model: Optional[str] = None
    """Base model for --data; default: the one recorded in the adapter's lorakit.json."""
    device: str = "auto"
    """Device for --data: auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """dtype for --data: auto, float32, bfloat16 or float16."""
    seq_len: int = 512
    """--data: maximum tokens per example."""
    batch_size: int = 8
    """--data: examples per forward pass."""
    max_examples: int = 0
    """--data: score at most this many examples (0 = all)."""
    json: bool = False
    """Print the result as JSON."""
    allow_pickle: bool = False
    """Read a pickle adapter (adapter_model.bin/.pt), which can run code when loaded; only if you trust it."""


@command("resize", "SVD-truncate an adapter to a smaller rank (--rank K or --energy 0.99) in PEFT format")(
    lambda p: _positional(p, ResizeOptions))
def _resize(args: argparse.Namespace) -> None:
    from ..lora.spectrum import resize_adapter

    opts = _options(ResizeOptions, args, "resize")
    if not opts.out:
        raise ConfigError(["--out is required: the folder for the resized adapter"], where="resize")
    result = resize_adapter(opts.adapter, opts.out, rank=opts.rank, energy=opts.energy,
                            allow_pickle=opts.allow_pickle)
    facts = {"adapter": opts.adapter, "out": str(result.out), "r_before": _config(opts.adapter)["r"],
             "r_after": result.config["r"], "rank_pattern": result.config["rank_pattern"],
             "energy_kept": result.energy_kept, "min_layer_energy_kept": result.min_layer_energy_kept,
             "bytes_before": result.bytes_before, "bytes_after": result.bytes_after,
             "params_before": result.params_before, "params_after": result.params_after}
    if not opts.json:
        _print_resize(facts, result)
    if opts.data:  # eval's own tables go to stderr when stdout is JSON
        with contextlib.redirect_stdout(sys.stderr) if opts.json else contextlib.nullcontext():
            facts["eval"] = compare_scores(opts, str(result.out))
        _note_eval(result.out, facts["eval"])
    if opts.json:
        print(json.dumps(facts, indent=2))


def _print_resize(facts: dict[str, Any], result) -> None:
    """The resize in three lines: ranks, energy kept, size and parameters before and after."""
    ranks = sorted(set(result.ranks.values()))
    print(f"resized {facts['adapter']} -> {result.out}: r {facts['r_before']} -> {facts['r_after']}"
          + (f" (per layer {ranks[0]}..{ranks[-1]}, {len(facts['rank_pattern'])} layers in rank_pattern)"
             if len(ranks) > 1 else ""))
    print(f"energy kept: {100 * result.energy_kept:.3f}% of the total, at least "
          f"{100 * result.min_layer_energy_kept:.3f}% in every layer")
    print(f"size on disk: {_mb(result.bytes_before)} -> {_mb(result.bytes_after)} "
          f"({100 * result.bytes_after / result.bytes_before:.1f}%); parameters {result.params_before:,} -> "
          f"{result.params_after:,}")


def compare_scores(opts: ResizeOptions, resized: str) -> dict[str, dict[str, float]]:
    """`lorakit eval`'s scores for the original and for the resized adapter, on the same data, and the change."""
    from .evaluate import EvalOptions, run_eval

    model_name = opts.model or recorded_base_model(opts.adapter, where="resize --data")
    scores: dict[str, dict[str, float]] = {}
    for label, adapter in (("original", opts.adapter), ("resized", resized)):
        print(f"--- {label} adapter ({adapter})")
        results = run_eval(EvalOptions(model=model_name, adapter=[adapter], device=opts.device, dtype=opts.dtype,
                                       data=None if opts.data == "auto" else opts.data, seq_len=opts.seq_len,
                                       batch_size=opts.batch_size, max_examples=opts.max_examples))
        scores["base"], scores[label] = results["base"], results["base + adapter"]
    scores["change"] = {k: scores["resized"][k] - scores["original"][k] for k in scores["original"]}
    print(f"\n{'metric':<20}{'original':>12}{'resized':>12}{'change':>12}")
    for metric in scores["original"]:
        print(f"{metric:<20}" + "".join(f"{scores[c][metric]:>12.4f}" for c in ("original", "resized", "change")))
    return scores


def _note_eval(out: Path, scores: dict) -> None:
    """Add the scores to the resize note in the new adapter's lorakit.json."""
    from ..atomic import atomic_write_json
    from ..lora.files import read_meta

    meta = read_meta(out)
    meta["resizes"][-1]["eval"] = scores
    atomic_write_json(out / "lorakit.json", meta)


def _config(adapter: str) -> dict[str, Any]:
    """adapter_config.json as a dict, with clear errors for a missing or broken file."""
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"{path} not found: an adapter folder holds adapter_config.json and "
                           "adapter_model.safetensors")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------------- info
@dataclass
class InfoOptions:
    """Options of `lorakit info`."""

    adapter: str = ""
    """Adapter folder (also accepted as the positional ADAPTER)."""
    json: bool = False
    """Print the facts as JSON."""
    allow_pickle: bool = False
    """Read a pickle adapter (adapter_model.bin/.pt), which can run code when loaded; only if you trust it."""


@command("info", "an adapter's provenance: base model and fingerprint, r/alpha/targets, size, parameters, "
         "training data, metrics, versions")(lambda p: _positional(p, InfoOptions))
def _info(args: argparse.Namespace) -> None:
    opts = _options(InfoOptions, args, "info")
    facts = adapter_info(opts.adapter, opts.allow_pickle)
    if opts.json:
        print(json.dumps(facts, indent=2, default=str))
    else:
        print_info(facts)


def adapter_info(adapter: str, allow_pickle: bool = False) -> dict[str, Any]:
    """Facts from adapter_config.json and the weights' header, plus lorakit.json's when it is there."""
    from ..lora.files import read_meta
    from ..lora.spectrum import FACTOR_SUFFIXES, folder_bytes

    config = _config(adapter)
    shapes, dtypes = _tensor_shapes(adapter, allow_pickle)
    lora_keys = [k for k in shapes if any(k.endswith(suffix) for pair in FACTOR_SUFFIXES for suffix in pair)]
    ranks = sorted({shapes[k][0] for k in lora_keys if any(k.endswith(a) for a, _ in FACTOR_SUFFIXES)})
    meta = read_meta(adapter)
    fingerprint = meta.get("base_fingerprint") or {}
    return {
        "adapter": adapter,
        "base_model": meta.get("base_model") or config.get("base_model_name_or_path"),
        "base_fingerprint": {k: fingerprint.get(k) for k in ("architecture", "model_class", "digest")}
        if fingerprint else None,
        "peft_type": config.get("peft_type"), "task_type": config.get("task_type"),
        "r": config.get("r"), "lora_alpha": config.get("lora_alpha"), "scaling": _scaling(config),
        "use_rslora": config.get("use_rslora", False), "use_dora": config.get("use_dora", False),
        "target_modules": config.get("target_modules"), "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {}, "modules_to_save": config.get("modules_to_save"),
        "adapted_layers": sum(1 for k in lora_keys if any(k.endswith(a) for a, _ in FACTOR_SUFFIXES)),
        "ranks_in_file": ranks, "dtypes": sorted(set(dtypes.values())),
        "lora_params": sum(math.prod(shapes[k]) for k in lora_keys),
        "other_params": sum(math.prod(s) for k, s in shapes.items() if k not in lora_keys),
        "params": sum(math.prod(s) for s in shapes.values()),
        "size_bytes": folder_bytes(adapter),
        "files": {f.name: f.stat().st_size for f in sorted(Path(adapter).iterdir()) if f.is_file()},
        "has_lorakit_json": bool(meta),
        "data_fingerprint": meta.get("data_fingerprint"),
        "training": meta.get("training"), "metrics": meta.get("metrics"), "versions": meta.get("versions"),
        "created": meta.get("created"), "resizes": meta.get("resizes"),
        "combined_from": meta.get("combined_from"),
    }


def _tensor_shapes(adapter: str, allow_pickle: bool) -> tuple[dict[str, list[int]], dict[str, str]]:
    """({key: shape}, {key: dtype}) from the safetensors header, without reading the tensors (a pickle
    adapter is loaded, when allowed)."""
    from safetensors import safe_open

    from ..lora.files import WEIGHTS_NAME, read_adapter_tensors

    path = Path(adapter) / WEIGHTS_NAME
    if not path.is_file():
        tensors = read_adapter_tensors(adapter, allow_pickle)  # or the clear error: missing, pickle refused
        return ({k: list(t.shape) for k, t in tensors.items()},
                {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()})
    shapes, dtypes = {}, {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shapes[key], dtypes[key] = list(piece.get_shape()), str(piece.get_dtype())
    except Exception as e:  # safetensors has its own error types for damaged headers
        raise AdapterError(f"{path}: cannot read safetensors header ({e}); the file is damaged or incomplete") \
            from None
    return shapes, dtypes


def _scaling(config: dict[str, Any]) -> Optional[float]:
    """The config's default scaling: lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not r or alpha is None:
        return None
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def print_info(facts: dict[str, Any]) -> None:
    """The facts as aligned lines; nested training facts and metrics one per line."""
    fp = facts["base_fingerprint"]
    lines = [
        ("adapter", facts["adapter"]),
        ("base model", facts["base_model"] or "(not recorded)"),
        ("base fingerprint", f"{fp['architecture']} / {fp['model_class']}, digest {fp['digest']}" if fp
         else "(none: no lorakit.json, so loading cannot check the base)"),
        ("task type", facts["task_type"] or "(not set)"),
        ("r / alpha / scaling", f"{facts['r']} / {facts['lora_alpha']} / "
         + (f"{facts['scaling']:.4g}" if facts["scaling"] is not None else "?")
         + (" (rsLoRA)" if facts["use_rslora"] else "") + (" + DoRA" if facts["use_dora"] else "")),
        ("targets", facts["target_modules"]),
        ("rank_pattern", f"{len(facts['rank_pattern'])} entries, ranks in file {facts['ranks_in_file']}"
         if facts["rank_pattern"] else "(none)"),
        ("modules_to_save", facts["modules_to_save"] or "(none)"),
        ("adapted layers", facts["adapted_layers"]),
        ("parameters", f"{facts['params']:,} ({facts['lora_params']:,} LoRA, {facts['other_params']:,} other), "
         f"{', '.join(facts['dtypes'])}"),
        ("size on disk", f"{_mb(facts['size_bytes'])} in {len(facts['files'])} files"),
        ("training data", facts["data_fingerprint"] or "(not recorded)"),
        ("created", facts["created"] or "(not recorded)"),
    ]
    for label, value in lines:
        print(f"{label:<22}{value}")
    for title in ("metrics", "versions", "training"):
        if facts[title]:
            print(f"{title}:")
            width = max(20, *(len(key) + 2 for key in facts[title]))
            for key, value in facts[title].items():
                print(f"  {key:<{width}}{value:.4f}" if isinstance(value, float) else f"  {key:<{width}}{value}")
    for note in facts["resizes"] or []:
        print(f"resized from {note['from']} at {note['at']}: r {note['r_before']} -> {note['r_after']}, "
              f"{100 * note['energy_kept']:.2f}% of the energy kept")
