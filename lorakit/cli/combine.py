"""`lorakit combine A=0.6 B=0.4 --method ties --density 0.5 --out DIR`: a weighted combination of adapter
folders (PEFT's add_weighted_adapter), written as a normal PEFT-format adapter."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..lora.combine import COMBINATIONS
from .args import add_options, build_config
from .commands import recorded_base_model, recorded_task
from .main import command


@dataclass
class CombineOptions:
    """Options of `lorakit combine` (the adapters and weights are positional: FOLDER=WEIGHT ...)."""

    method: str = "linear"
    """How to combine: linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, or *_svd variants."""
    density: float = 0.5
    """Fraction of entries kept by ties / dare / magnitude_prune methods (ignored by linear, cat, svd)."""
    svd_rank: Optional[int] = None
    """Rank of the result for svd methods (default: the largest source rank)."""
    out: str = "combined"
    """Folder to write the combined adapter to."""
    model: Optional[str] = None
    """Base model; default: the one named in the adapters' lorakit.json / adapter_config.json."""
    seed: int = 0
    """Seed for the random pruning of the dare methods."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    ignore_base_mismatch: bool = False
    """Load adapters even when their base-model fingerprint differs (experts only)."""


def parse_sources(entries: list[str]) -> list[tuple[str, float]]:
    """FOLDER=WEIGHT entries as [(folder, weight)]; every bad entry is reported at once."""
    sources, problems = [], []
    for entry in entries:
        path, sep, weight = entry.rpartition("=")
        try:
            value = float(weight) if sep else None
        except ValueError:
            value = None
        if value is None:
            problems.append(f"{entry!r}: expected FOLDER=WEIGHT, e.g. runs/legal/adapter=0.6")
        elif not (Path(path) / "adapter_config.json").is_file():
            problems.append(f"{entry!r}: {path} is not an adapter folder (no adapter_config.json)")
        else:
            sources.append((path, value))
    if len(entries) < 2 and not problems:
        problems.append("give at least two adapters to combine, as FOLDER=WEIGHT")
    if problems:
        raise ConfigError(problems, where="combine options")
    return sources


def check_combination(opts: CombineOptions, sources: list[tuple[str, float]]) -> None:
    """What can be refused before the base model loads: an --out that would replace a source. (Unequal ranks
    are the library's to judge, layer by layer; its message names the folders, see run_combine.)"""
    out = Path(opts.out).resolve()
    problems = [f"--out {opts.out} would replace the source adapter {path}; write the combination to another folder"
                for path, _ in sources if out == Path(path).resolve() or out in Path(path).resolve().parents]
    if problems:
        raise ConfigError(problems, where="combine options")


def base_model_of(folders: list[str]) -> str:
    """The base model the adapters name (each one's recorded base model); they must agree."""
    names = {recorded_base_model(folder, where="combine options") for folder in folders}
    if len(names) > 1:
        raise ConfigError([f"the adapters name different base models {sorted(names)}: they cannot be combined "
                           "(LoRA updates only add up over the same base weights)"], where="combine options")
    return names.pop()


def _combine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", metavar="FOLDER=WEIGHT", help="adapter folders and their weights")
    add_options(parser, CombineOptions)


@command("combine", "weighted combination of adapters (linear, cat, svd, ties, dare_ties ...) into a new adapter")(
    _combine_options)
def _combine(args: argparse.Namespace) -> None:
    opts = build_config(CombineOptions, args)
    if opts.method not in COMBINATIONS:
        raise ConfigError([f"--method must be one of {', '.join(COMBINATIONS)}, got {opts.method!r}"], where="combine options")
    sources = parse_sources(args.sources)
    check_combination(opts, sources)
    out = run_combine(opts, sources)
    print(f"combined adapter ({opts.method}) written to {out}")


def run_combine(opts: CombineOptions, sources: list[tuple[str, float]]) -> Path:
    """Load the sources on their base model, combine them, save the result as `opts.out`."""
    import torch

    from .. import PeftModel
    from ..atomic import atomic_directory
    from ..models import load_model

    task = recorded_task(sources[0][0]) or "causal-lm"
    loaded = load_model(opts.model or base_model_of([p for p, _ in sources]), task=task, device=opts.device)
    names = [f"source{i}" for i in range(len(sources))]
    model = PeftModel.from_pretrained(loaded.model, sources[0][0], adapter_name=names[0],
                                      ignore_base_mismatch=opts.ignore_base_mismatch)
    for name, (path, _) in zip(names[1:], sources[1:]):
        model.load_adapter(path, adapter_name=name, ignore_base_mismatch=opts.ignore_base_mismatch)
    torch.manual_seed(opts.seed)
    try:
        model.add_weighted_adapter(names, [w for _, w in sources], "default", combination_type=opts.method,
                                   density=opts.density, svd_rank=opts.svd_rank)
    except ConfigError as e:  # the library knows the adapters as source0, source1 ...: name the folders
        folders = {f"'{name}'": repr(path) for name, (path, _) in zip(names, sources)}
        raise ConfigError([re.sub("|".join(map(re.escape, folders)), lambda m: folders[m.group(0)], p)
                           for p in e.problems], where="combine options") from None
    model.adapter_metadata["default"].update(
        base_model=loaded.name, combination_type=opts.method,
        combined_from={str(Path(p).resolve()): w for p, w in sources},
        density=opts.density if opts.method not in ("linear", "cat", "svd") else None)
    with atomic_directory(opts.out) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
    return Path(opts.out)
