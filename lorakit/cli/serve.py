"""`lorakit serve`: an OpenAI-compatible HTTP server, many adapters over one base, chosen per request."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .args import add_options, build_config
from .main import command


@dataclass
class ServeOptions:
    """Options of `lorakit serve`."""

    model: str = "smollm2-135m"
    """Base model: an embedded name (smollm2-135m), a local folder, a .gguf file or a hub id."""
    adapter: list[str] = field(default_factory=list)
    """An adapter to serve, as NAME=FOLDER (or FOLDER: named after the folder); repeat for several."""
    adapters_dir: Optional[str] = None
    """Folder that POST /v1/adapters may load adapters from (nothing outside it); unset = no run-time loading."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """Port to listen on."""
    api_key: Optional[str] = None
    """Require 'Authorization: Bearer KEY' on /v1 (default: the LORAKIT_API_KEY environment variable, if set)."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """auto (bf16 on capable GPUs, fp32 on CPU), float32, bfloat16 or float16."""
    max_batch: int = 16
    """Most requests decoded together in one forward pass; more wait their turn."""
    max_tokens: int = 512
    """Most tokens one request may generate."""
    max_prompt_tokens: int = 2048
    """Longest prompt accepted, in tokens."""
    max_concurrent: int = 64
    """Requests running or waiting at once; more are refused with 429."""
    max_body_bytes: int = 1048576
    """Largest request body accepted, in bytes."""
    ignore_base_mismatch: bool = False
    """Load adapters even when their base-model fingerprint differs (experts only)."""
    stall_timeout: float = 30.0
    """Seconds a connection may stall before it is closed: a request that stops arriving (a client gone
    half-way), or a response the client stops reading."""
    shutdown_timeout: float = 30.0
    """On SIGTERM or Ctrl-C, seconds to let requests in flight finish; then they are cancelled and the server exits."""

    def validate(self) -> "ServeOptions":
        problems = [f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                    for name in ("max_batch", "max_tokens", "max_prompt_tokens", "max_concurrent", "max_body_bytes")
                    if getattr(self, name) < 1]
        problems += [f"--{name.replace('_', '-')} must be above 0 seconds, got {getattr(self, name)}"
                     for name in ("stall_timeout", "shutdown_timeout") if not getattr(self, name) > 0]
        if not 0 < self.port < 65536:
            problems.append(f"--port must be 1-65535, got {self.port}")
        if self.adapters_dir is not None and not Path(self.adapters_dir).is_dir():
            problems.append(f"--adapters-dir {self.adapters_dir} is not a folder")
        try:
            clash = set(named_adapters(self.adapter)) & {self.model, Path(self.model).name}
            if clash:
                problems.append(f"--adapter: {sorted(clash)[0]!r} is the base model's name (requests use it for the "
                                "base); give the adapter another name as NAME=FOLDER")
        except ConfigError as e:
            problems.extend(e.problems)
        if problems:
            raise ConfigError(problems, where="serve options")
        return self


def named_adapters(entries: list[str]) -> dict[str, str]:
    """NAME=FOLDER entries (or bare FOLDERs, named after the folder) as {name: folder}."""
    from ..serve.adapters import name_problem

    out: dict[str, str] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = Path(entry).name, entry
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError([f"--adapter {entry}: {path} is not an adapter folder (no adapter_config.json)"])
        if name in out:
            raise ConfigError([f"--adapter {entry}: the name {name!r} is used twice"])
        if name == "base":
            raise ConfigError([f"--adapter {entry}: 'base' names the base model in requests; give the adapter "
                               "another name as NAME=FOLDER"])
        problem = name_problem(name)
        if problem:
            raise ConfigError([f"--adapter {entry}: {name!r} cannot name an adapter: {problem} (give a name as "
                               "NAME=FOLDER)"])
        out[name] = path
    return out


@command("serve", "OpenAI-compatible HTTP server: many adapters over one base, chosen per request by `model`")(
    lambda p: add_options(p, ServeOptions))
def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from ..serve.app import build_app
    from ..serve.protocol import Limits
    from ..serve.server import server_config

    opts = build_config(ServeOptions, args)
    limits = Limits(max_tokens=opts.max_tokens, max_prompt_tokens=opts.max_prompt_tokens,
                    max_concurrent=opts.max_concurrent, max_body_bytes=opts.max_body_bytes)
    app = build_app(opts.model, named_adapters(opts.adapter), opts.adapters_dir, limits,
                    opts.api_key or os.environ.get("LORAKIT_API_KEY"), opts.device, opts.dtype, opts.max_batch,
                    opts.ignore_base_mismatch)
    print(f"lorakit serve: {opts.model} with adapters {sorted(named_adapters(opts.adapter)) or 'none'} on "
          f"http://{opts.host}:{opts.port}/v1", flush=True)
    uvicorn.Server(server_config(app, opts.host, opts.port, opts.stall_timeout, opts.shutdown_timeout)).run()
