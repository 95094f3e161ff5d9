"""The adapters a server holds: which request `model` names map to which adapter, run-time loading
(only from inside the adapters folder: see confine.py) and unloading."""
from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..lora.layer import BASE_ADAPTER
from .confine import AdaptersFolder, shown_path
from .engine import Engine
from .protocol import ApiError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # whole name (fullmatch): no '.', no newline
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_FILES = REQUIRED_FILES + ("lorakit.json",)
# Words of the adapter files' tensor keys: an adapter so named does not load (its keys read ambiguously).
_KEY_WORDS = {"weight", "bias", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
              "base_layer"}


def name_problem(name: str) -> Optional[str]:
    """Why `name` cannot name a served adapter, or None. Each adapter is a key of the LoRA layers' ModuleDicts,
    so neither a '.' nor a name a ModuleDict already uses (`to`, `train`, `forward` ...) can load."""
    if not NAME_PATTERN.fullmatch(name):
        return "adapter names are 1-64 letters, digits, '_' or '-', starting with a letter or digit"
    if name in _KEY_WORDS or hasattr(torch.nn.ModuleDict(), name):
        return f"the LoRA layers use the word {name!r} themselves; choose another adapter name"
    return None


class AdapterRegistry:
    """Adapter names -> what GET /v1/models shows of their folders, kept in step with the engine's model."""

    def __init__(self, engine: Engine, base_names: set[str], adapters_dir: Optional[str] = None,
                 ignore_base_mismatch: bool = False):
        self.engine = engine
        self.base_names = {"base"} | {n for n in base_names if n}
        self.folder = AdaptersFolder(adapters_dir) if adapters_dir else None
        self.ignore_base_mismatch = ignore_base_mismatch
        self.adapters: dict[str, str] = {}  # served name -> its folder as shown to clients (never an absolute path)
        self._unloading: set[str] = set()

    # ------------------------------------------------------------------ lookups
    def resolve(self, model: str) -> str:
        """The adapter a request's `model` field picks (BASE_ADAPTER for the base)."""
        if model in self.base_names:
            return BASE_ADAPTER
        if model in self.adapters:
            return model
        known = ", ".join(["base"] + sorted(self.adapters))
        raise ApiError(404, f"the model {shown_path(model)} does not exist; this server has: {known}", "model",
                       "model_not_found")

    # ------------------------------------------------------------------ loading
    def load_blocking(self, name: str, path: str) -> None:
        """Load at start-up (any path the operator names), on the calling thread."""
        self._check_name(name)
        self._attach(name, str(Path(path).resolve()), Path(path).resolve().name)

    def adopt(self, name: str, source: str = "(in memory)") -> None:
        """Serve an adapter the engine's model already holds (e.g. built in Python, not read from disk)."""
        if name not in getattr(self.engine.model, "peft_config", {}):
            raise ValueError(f"the engine's model has no adapter named {name!r}")
        self._check_name(name)
        self.adapters[name] = source

    async def load(self, name: Optional[str], path: Optional[str]) -> dict:
        """POST /v1/adapters: load `path` (inside the adapters folder) as `name`. The adapter's files are read
        through descriptors opened inside the folder into a private copy, which is what gets loaded."""
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            raise ApiError(400, "give both name and path (strings)", "name" if not isinstance(name, str) else "path")
        self._check_name(name)
        if self.folder is None:
            raise ApiError(403, "loading adapters at run time is off: start lorakit serve with --adapters-dir DIR",
                           "path", "adapters_dir_not_set")
        with tempfile.TemporaryDirectory(prefix="lorakit-adapter-") as copy:
            shown = await asyncio.to_thread(self.folder.copy_adapter, path, ADAPTER_FILES, REQUIRED_FILES, copy)
            try:
                await asyncio.wrap_future(self.engine.call(lambda: self._attach(name, copy, shown)))
            except ApiError:
                raise
            except Exception as e:  # lorakit's AdapterError, a damaged file ...
                reason = str(e).replace(copy, shown)  # the client's path, not the server's copy
                raise ApiError(400, f"cannot load adapter {name!r} from {shown_path(path)}: {reason}", "path",
                               "adapter_load_failed") from None
        return self.describe(name)

    def _check_name(self, name: str) -> None:
        problem = name_problem(name)
        if problem:
            raise ApiError(400, problem, "name")
        if name in self.base_names or name == BASE_ADAPTER:
            raise ApiError(400, f"{name!r} names the base model; choose another adapter name", "name")
        if name in self.adapters or name in self._unloading:
            raise ApiError(409, f"an adapter named {name!r} is already loaded; DELETE it first", "name",
                           "adapter_exists")

    def _attach(self, name: str, folder: str, shown: str) -> None:
        """On the engine thread: add the adapter to the model (wrapping a plain model the first time). A load
        that fails leaves the model as it was."""
        from ..lora.inject import unwrap
        from ..peft_model import PeftModel

        if name in self.adapters:  # a concurrent load of the same name got here first
            raise ApiError(409, f"an adapter named {name!r} is already loaded", "name", "adapter_exists")
        model = self.engine.model
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(folder, adapter_name=name, ignore_base_mismatch=self.ignore_base_mismatch)
            else:
                self.engine.model = PeftModel.from_pretrained(model, folder, adapter_name=name,
                                                              ignore_base_mismatch=self.ignore_base_mismatch)
        except BaseException:
            if isinstance(model, PeftModel):
                if name in model.peft_config:  # added, then its tensors did not fit
                    model.delete_adapter(name)
            else:  # from_pretrained put LoRA layers into the plain model before its tensors were refused
                unwrap(model, merge=False)
            raise
        for p in self.engine.model.parameters():
            p.requires_grad_(False)
        self.adapters[name] = shown

    # ------------------------------------------------------------------ unloading
    async def unload(self, name: str) -> dict:
        """DELETE /v1/adapters/{name}: refuse new requests for it at once, drop it when its requests end."""
        if name not in self.adapters:
            raise ApiError(404, f"no adapter named {shown_path(name)} is loaded", "name", "model_not_found")
        folder = self.adapters.pop(name)
        self._unloading.add(name)
        try:
            while name in self.engine.adapters_in_use():
                await asyncio.sleep(0.02)
            await asyncio.wrap_future(self.engine.call(lambda: self.engine.model.delete_adapter(name)))
        finally:
            self._unloading.discard(name)
        return {"id": name, "object": "model", "deleted": True, "path": folder}

    def describe(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "lorakit", "parent": "base",
                "root": self.adapters[name]}

    def listing(self, base_name: str) -> dict:
        data = [{"id": "base", "object": "model", "created": 0, "owned_by": "lorakit", "parent": None,
                 "root": Path(base_name).name if Path(base_name).is_absolute() else base_name}]
        return {"object": "list", "data": data + [self.describe(n) for n in sorted(self.adapters)]}
