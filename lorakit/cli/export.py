"""`lorakit export`: an adapter to where people run models.

    lorakit export --adapter RUN/adapter --format gguf --out DIR [--quant f16,q8_0]
        DIR/adapter.gguf        the adapter as a llama.cpp LoRA GGUF (llama-cli --lora, Ollama ADAPTER)
        DIR/model-<quant>.gguf  base + adapter merged, tokenizer and chat template carried from the base GGUF
        DIR/Modelfile           Ollama: FROM the base GGUF + ADAPTER adapter.gguf (Modelfile.merged: the merged file)
        DIR/export.json         what was written, sizes and times
    lorakit export --adapter RUN/adapter --format peft --for vllm|llama.cpp --out DIR [--rank N]
        what the engine would refuse, and a plain-LoRA adapter it accepts (truncated SVD where needed)
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..errors import ConfigError, ExportError
from .args import add_options, build_config
from .main import command


@dataclass
class ExportOptions:
    """Options of `lorakit export`."""

    adapter: str = ""
    """The adapter folder to export (a run's adapter/)."""
    format: Literal["gguf", "peft"] = "gguf"
    """gguf: llama.cpp / Ollama files; peft: a plain-LoRA PEFT adapter the engine named by --for accepts."""
    out: Optional[str] = None
    """Folder to write to (default: gguf/ or export-ENGINE/ beside the adapter folder)."""
    model: Optional[str] = None
    """Base model; default: the one the adapter records (lorakit.json / adapter_config.json)."""
    quant: str = "f16"
    """Merged GGUF type(s), comma-separated: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0; none = no merged file."""
    adapter_dtype: Literal["f32", "f16"] = "f32"
    """Tensor type of the LoRA GGUF's factors."""
    engine: Optional[Literal["vllm", "llama.cpp"]] = None
    """(--for) The engine a --format peft adapter is checked and rewritten for."""
    rank: Optional[int] = None
    """Rank of the rewritten plain-LoRA layers (--format peft); default: the adapter's own, capped by the engine's
    limit (vLLM's --max-lora-rank default 16)."""
    max_lora_rank: Optional[int] = None
    """The engine's rank limit the server will be started with (vLLM --max-lora-rank: 8 ... 512; default 16)."""
    prompts: int = 4
    """Demo prompts the rewritten adapter's logits are compared on (--format peft)."""
    ignore_base_mismatch: bool = False
    """Load the adapter even when its base-model fingerprint differs (experts only)."""

    def validate(self) -> "ExportOptions":
        problems = []
        if not self.adapter:
            problems.append("--adapter is required: the adapter folder to export (e.g. runs/demo/adapter)")
        if self.format == "peft" and self.engine is None:
            problems.append("--format peft needs --for vllm or --for llama.cpp: the engine to check the adapter for")
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank must be at least 1, got {self.rank}")
        from ..export.gguf_merged import QUANTS

        bad = [q for q in self.quants() if q not in QUANTS]
        if bad:
            problems.append(f"--quant {', '.join(bad)}: not a type the gguf package writes; use {', '.join(QUANTS)} "
                            "or none")
        if problems:
            raise ConfigError(problems, where="export")
        return self

    def quants(self) -> list[str]:
        words = [w.strip().lower() for w in self.quant.split(",") if w.strip()]
        return [] if words in ([], ["none"]) else words


def _configure(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ExportOptions, skip=("engine",))
    parser.add_argument("--for", "--engine", dest="engine", default=argparse.SUPPRESS, choices=["vllm", "llama.cpp"],
                        help="the engine a --format peft adapter is checked and rewritten for")


def load_for_export(opts: ExportOptions):
    """(PeftModel on CPU in fp32, tokenizer, base model name)."""
    from .commands import ModelOptions, load_with_adapters, recorded_base_model

    base = opts.model or recorded_base_model(opts.adapter, where="export")
    model, tokenizer = load_with_adapters(ModelOptions(model=base, adapter=[opts.adapter], device="cpu",
                                                       dtype="float32",
                                                       ignore_base_mismatch=opts.ignore_base_mismatch),
                                          where="export")
    return model.eval(), tokenizer, base


def _timed(facts: dict, key: str, work):
    start = time.perf_counter()
    result = work()
    facts.setdefault("seconds", {})[key] = round(time.perf_counter() - start, 2)
    return result


def _modelfiles(out: Path, base_gguf: Optional[Path], merged: list[dict], chat_template: Optional[str],
                eos: Optional[str], with_adapter: bool) -> dict:
    """Modelfile: the base GGUF + ADAPTER adapter.gguf (or the merged file when there is no adapter.gguf);
    Modelfile.merged: the first merged file."""
    from ..export.modelfile import translate_chat_template, write_modelfile

    template = translate_chat_template(chat_template)
    stops = (eos,) if eos else ()
    base = str(base_gguf) if base_gguf else "BASE.gguf  # the base model as GGUF (convert_hf_to_gguf.py)"
    written = []
    if with_adapter:
        written.append(str(write_modelfile(out / "Modelfile", base, template, adapter="./adapter.gguf",
                                           extra_stops=stops)))
    if merged:
        name = "Modelfile.merged" if with_adapter else "Modelfile"
        written.append(str(write_modelfile(out / name, "./" + Path(merged[0]["path"]).name, template,
                                           extra_stops=stops)))
    return {"files": written, "template": template.note}


def export_gguf(opts: ExportOptions) -> dict:
    """Write adapter.gguf, the merged model(s) and the Modelfiles; returns the facts written to export.json."""
    from ..export.gguf_adapter import write_lora_gguf
    from ..export.gguf_merged import source_gguf, write_merged_gguf

    facts: dict = {"adapter": opts.adapter}
    model, tokenizer, base = _timed(facts, "load", lambda: load_for_export(opts))
    out = Path(opts.out or Path(opts.adapter).resolve().parent / "gguf")
    try:
        facts["lora_gguf"] = _timed(facts, "adapter_gguf", lambda: write_lora_gguf(model, out / "adapter.gguf",
                                                                                  dtype=opts.adapter_dtype))
    except ExportError as e:
        if not opts.quants():
            raise
        facts["lora_gguf"] = {"skipped": str(e)}
        print(f"warning: adapter.gguf not written, the merged GGUF carries the adapter instead. {e}")
    source = source_gguf(base)
    facts["base_gguf"] = str(source) if source else None
    merged_files = []
    if opts.quants():
        merged = _timed(facts, "merge", lambda: model.merge_and_unload(safe_merge=True))
        for quant in opts.quants():
            merged_files.append(_timed(facts, f"merged_{quant}", lambda q=quant: write_merged_gguf(
                merged, out / f"model-{q}.gguf", source, q)))
    facts["merged"] = merged_files
    facts["modelfile"] = _modelfiles(out, source, merged_files, getattr(tokenizer, "chat_template", None),
                                     getattr(tokenizer, "eos_token", None), "skipped" not in facts["lora_gguf"])
    from ..atomic import atomic_write_json

    atomic_write_json(out / "export.json", facts)
    _print_gguf(facts, out)
    return facts


def _print_gguf(facts: dict, out: Path) -> None:
    lora = facts["lora_gguf"]
    if "skipped" not in lora:
        print(f"adapter.gguf: {lora['layers']} layers, alpha {lora['alpha']:g}, {lora['bytes'] / 1e6:.1f} MB "
              f"({facts['seconds']['adapter_gguf']} s) -> {lora['path']}")
    for item in facts["merged"]:
        print(f"merged {item['quant']}: {item['bytes'] / 1e6:.1f} MB ({facts['seconds']['merged_' + item['quant']]} s)"
              f" -> {item['path']}")
    print(f"Modelfile: {facts['modelfile']['template']} -> {', '.join(facts['modelfile']['files'])}")
    base = facts["base_gguf"] or "BASE.gguf"
    print(f"\nrun it with llama.cpp:\n  llama-cli -m {base} --lora {out / 'adapter.gguf'} -cnv --temp 0\n"
          f"or Ollama:\n  ollama create my-adapter -f {out / 'Modelfile'}")


@command("export", "export an adapter for llama.cpp / Ollama (GGUF) or check and rewrite it for vLLM (--format peft)")(
    _configure)
def _export(args: argparse.Namespace) -> None:
    opts = build_config(ExportOptions, args)
    if opts.format == "gguf":
        export_gguf(opts)
    else:
        export_peft(opts)


def export_peft(opts: ExportOptions) -> dict:
    """`--format peft --for ENGINE`: the check, the plain-LoRA rewrite and its measured error."""
    from ..export.portability import print_portable, write_portable

    model, tokenizer, _ = load_for_export(opts)
    out = Path(opts.out or Path(opts.adapter).resolve().parent / f"export-{opts.engine}")
    facts = write_portable(model, tokenizer, opts.adapter, out, opts.engine, opts.max_lora_rank, opts.rank,
                           opts.prompts)
    print_portable(facts)
    return facts
