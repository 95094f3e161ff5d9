"""The adapters a server holds: which request `model` names map to which adapter, run-time loading
(only from inside the adapters folder, real paths resolved, symlinks included) and unloading."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Optional

from ..lora.layer import BASE_ADAPTER
from .engine import Engine
from .protocol import ApiError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "lorakit.json")


class AdapterRegistry:
    """Adapter names -> folders, kept in step with the engine's model."""

    def __init__(self, engine: Engine, base_names: set[str], adapters_dir: Optional[str] = None,
                 ignore_base_mismatch: bool = False):
        self.engine = engine
        self.base_names = {"base"} | {n for n in base_names if n}
        self.root = Path(adapters_dir).resolve(strict=True) if adapters_dir else None
        self.ignore_base_mismatch = ignore_base_mismatch
        self.adapters: dict[str, str] = {}  # served name -> folder
        self._unloading: set[str] = set()

    # ------------------------------------------------------------------ lookups
    def resolve(self, model: str) -> str:
        """The adapter a request's `model` field picks (BASE_ADAPTER for the base)."""
        if model in self.base_names:
            return BASE_ADAPTER
        if model in self.adapters:
            return model
        known = ", ".join(sorted(self.base_names | set(self.adapters)))
        raise ApiError(404, f"the model {model!r} does not exist; this server has: {known}", "model",
                       "model_not_found")

    # ------------------------------------------------------------------ loading
    def load_blocking(self, name: str, path: str) -> None:
        """Load at start-up (any path the operator names), on the calling thread."""
        self._check_name(name)
        self._attach(name, str(Path(path).resolve()))

    def adopt(self, name: str, source: str = "(in memory)") -> None:
        """Serve an adapter the engine's model already holds (e.g. built in Python, not read from disk)."""
        if name not in getattr(self.engine.model, "peft_config", {}):
            raise ValueError(f"the engine's model has no adapter named {name!r}")
        self._check_name(name)
        self.adapters[name] = source

    async def load(self, name: Optional[str], path: Optional[str]) -> dict:
        """POST /v1/adapters: load `path` (inside the adapters folder) as `name`."""
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            raise ApiError(400, "give both name and path (strings)", "name" if not isinstance(name, str) else "path")
        self._check_name(name)
        folder = self.confine(path)
        try:
            await asyncio.wrap_future(self.engine.call(lambda: self._attach(name, str(folder))))
        except ApiError:
            raise
        except Exception as e:  # lorakit's AdapterError, a damaged file ...
            raise ApiError(400, f"cannot load adapter {name!r} from {path!r}: {e}", "path",
                           "adapter_load_failed") from None
        return self.describe(name)

    def _check_name(self, name: str) -> None:
        if not NAME_PATTERN.match(name):
            raise ApiError(400, "adapter names are 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                           "or digit", "name")
        if name in self.base_names or name == BASE_ADAPTER:
            raise ApiError(400, f"{name!r} names the base model; choose another adapter name", "name")
        if name in self.adapters or name in self._unloading:
            raise ApiError(409, f"an adapter named {name!r} is already loaded; DELETE it first", "name",
                           "adapter_exists")

    def confine(self, path: str) -> Path:
        """The real folder `path` names, refused unless it (and its files) lie inside the adapters folder."""
        if self.root is None:
            raise ApiError(403, "loading adapters at run time is off: start lorakit serve with --adapters-dir DIR",
                           "path", "adapters_dir_not_set")
        given = Path(path)
        real = (given if given.is_absolute() else self.root / given).resolve(strict=False)
        if not real.is_relative_to(self.root):
            raise ApiError(403, f"{path!r} is outside the adapters folder; only folders inside it can be loaded",
                           "path", "path_outside_adapters_dir")
        if not real.is_dir():
            raise ApiError(404, f"no adapter folder {path!r} in the adapters folder", "path", "adapter_not_found")
        for name in ADAPTER_FILES:
            file = real / name
            if (file.exists() or file.is_symlink()) and not file.resolve().is_relative_to(self.root):
                raise ApiError(403, f"{path}/{name} links outside the adapters folder", "path",
                               "path_outside_adapters_dir")
        return real

    def _attach(self, name: str, folder: str) -> None:
        """On the engine thread: add the adapter to the model (wrapping a plain model the first time)."""
        from ..peft_model import PeftModel

        if name in self.adapters:  # a concurrent load of the same name got here first
            raise ApiError(409, f"an adapter named {name!r} is already loaded", "name", "adapter_exists")
        model = self.engine.model
        if isinstance(model, PeftModel):
            model.load_adapter(folder, adapter_name=name, ignore_base_mismatch=self.ignore_base_mismatch)
        else:
            self.engine.model = PeftModel.from_pretrained(model, folder, adapter_name=name,
                                                          ignore_base_mismatch=self.ignore_base_mismatch)
        for p in self.engine.model.parameters():
            p.requires_grad_(False)
        self.adapters[name] = folder

    # ------------------------------------------------------------------ unloading
    async def unload(self, name: str) -> dict:
        """DELETE /v1/adapters/{name}: refuse new requests for it at once, drop it when its requests end."""
        if name not in self.adapters:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "name", "model_not_found")
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
                 "root": base_name}]
        return {"object": "list", "data": data + [self.describe(n) for n in sorted(self.adapters)]}
