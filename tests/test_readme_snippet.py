"""The README's Python snippet runs as written, and `import lorakit` (and loading a model) prints nothing."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

import lorakit.models
from lorakit.models import LoadedModel
from tests.conftest import tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippet(marker: str = "**Python, PEFT's names.**") -> str:
    """The first ```python block after `marker` in README.md."""
    text = README.read_text(encoding="utf-8")
    start = text.index(marker)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {marker!r} in README.md"
    return match.group(1)


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    # the embedded SmolLM2 takes minutes to dequantize on CPU: the snippet's load_model gives a tiny Llama
    # with the same module names instead (same seed each call, so fresh_base is the same base)
    def tiny(name, *args, **kwargs) -> LoadedModel:
        assert name == "smollm2-135m"
        return LoadedModel(tiny_llama(), None, name, name, torch.float32, torch.device("cpu"), "causal-lm")

    monkeypatch.setattr(lorakit.models, "load_model", tiny)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(python_snippet(), "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    assert "trainable params:" in capsys.readouterr().out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    merged = scope["merged"]
    assert not any("lora" in name for name, _ in merged.named_modules())
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():  # merged == the reloaded adapter on a fresh base (B is zero at init: also == base)
        assert torch.allclose(merged(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, atol=1e-5)


def test_import_and_model_loading_print_nothing():
    # transformers imports torchao (when installed) on the first model load, through its quantizers;
    # torchao then logged "Failed to load .../_C_mxfp8...so" and torch enum deprecation notes
    code = ("import lorakit, lorakit.models, transformers.quantizers.auto\n"
            "from lorakit import LoraConfig, get_peft_model\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=README.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)
