"""CorDA preprocessing (PEFT's `preprocess_corda`, with its semantics and file keys), written for lorakit.

CorDA (context-oriented decomposition, https://huggingface.co/papers/2406.05223) starts each adapter from the SVD of
W C, where C is the covariance of the layer's inputs over some sample data:

    W C = U S Vh,   V_WC = (Vh C^-1)^T        so  W = U S V_WC^T  exactly.

preprocess_corda runs the sample data once, leaves `eigens` (U_WC (out, r), S_WC (r,), V_WC (in, r), cropped to each
layer's rank: the r largest components for 'ipm', the r smallest for 'kpm') on every targeted nn.Linear / GPT-2 Conv1D,
and get_peft_model(model, LoraConfig(init_lora_weights='corda', ...)) then builds A and B from them (see
variants._init_corda) and leaves W the residual.

    config = LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method="kpm"))
    preprocess_corda(model, config, run_model=lambda: [model(**batch) for batch in sample_batches])
    model = get_peft_model(model, config)

Files: cache_file holds the cropped eigens ('{name}.eigens.S_WC' ...), covariance_file the covariances ('{name}');
lorakit writes both as safetensors (atomically) and reads those, or the torch.save files PEFT writes (with torch's
tensors-only loader).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write
from ..errors import ConfigError
from .inject import find_targets
from .targets import is_conv1d_gpt2, linear_types

if TYPE_CHECKING:
    from ..config import LoraConfig

TEMPORARY_FIELDS = ("sample_count", "covariance_matrix", "corda_method", "rank")
"""What preprocessing leaves on a layer besides `eigens` (pruned unless corda_config.prune_temporary_fields=False)."""
MAX_DAMPING_STEPS = 40
"""The damping added to C's diagonal doubles until C is invertible to 5%; past this many doublings C is unusable."""


@dataclass
class CordaEigens:
    """One layer's cropped decomposition: W ≈ U_WC diag(S_WC) V_WC^T over the kept components."""

    S_WC: torch.Tensor
    """Singular values of W C, (r,)."""
    U_WC: torch.Tensor
    """Left singular vectors of W C, (out, r)."""
    V_WC: torch.Tensor
    """Right singular vectors of W C times C^-1, (in, r)."""


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: "LoraConfig", run_model: Optional[Callable[[], object]] = None,
                     hooked_model: Optional[nn.Module] = None) -> None:
    """Leave CorDA's `eigens` on each targeted linear layer of `model`, for get_peft_model(model, lora_config).

    Args:
        model: the model the adapter goes on (not yet wrapped).
        lora_config: a LoraConfig with init_lora_weights='corda'; its corda_config, target_modules and r / rank_pattern
            are read.
        run_model: called once with hooks on the targeted layers: run the model over the sample data (PEFT's advice:
            about hidden_size / tokens_per_sample * 128 samples). Not needed when the cache or covariance file exists.
        hooked_model: the model whose layers are hooked while run_model runs, when it is not `model` (a copy, say);
            layers are matched by name.

    Raises:
        ConfigError: no corda_config, no run_model and no file to read, a file that lacks a layer, or a layer that saw
            no input or only NaN / inf.
    """
    corda = lora_config.corda_config
    if corda is None:
        raise ConfigError(["lora_config.corda_config is None: make the config with init_lora_weights='corda' (or "
                           "pass corda_config=CordaConfig(...))"], where="preprocess_corda")
    targets = corda_targets(model, lora_config)
    cache = read_tensors(corda.cache_file, "cache_file")
    if cache is not None:
        for name, module in targets:
            module.eigens = CordaEigens(*(_entry(cache, f"{name}.eigens.{part}", corda.cache_file)
                                          for part in ("S_WC", "U_WC", "V_WC")))
        return
    if corda.corda_method not in ("ipm", "kpm"):
        raise ConfigError([f"corda_method must be 'ipm' or 'kpm' when cache_file is not provided, got "
                           f"{corda.corda_method!r}"], where="preprocess_corda")
    for name, module in targets:
        module.corda_method = corda.corda_method
        module.rank = lora_config.rank_for(name)
    collect_covariances(model, lora_config, targets, run_model, hooked_model)
    for i, (name, module) in enumerate(targets):
        if corda.verbose:
            print(f"CorDA: decomposing {name} ({i + 1}/{len(targets)})", file=sys.stderr)
        module.eigens = crop_eigens(layer_eigens(module), module.corda_method, module.rank, name)
    if corda.prune_temporary_fields:
        for _, module in targets:
            for field_name in TEMPORARY_FIELDS:
                if hasattr(module, field_name):
                    delattr(module, field_name)
    if corda.cache_file is not None:
        write_tensors(corda.cache_file, {f"{name}.eigens.{part}": getattr(module.eigens, part)
                                         for name, module in targets for part in ("S_WC", "U_WC", "V_WC")})


def corda_targets(model: nn.Module, config: "LoraConfig") -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers CorDA decomposes: the config's targets that are nn.Linear or GPT-2 Conv1D."""
    names = find_targets(model, config, required=False)
    modules = [(name, model.get_submodule(name)) for name in names]
    return [(name, module) for name, module in modules if isinstance(module, linear_types())]


def collect_covariances(model: nn.Module, config: "LoraConfig", targets: list[tuple[str, nn.Module]],
                        run_model: Optional[Callable[[], object]], hooked_model: Optional[nn.Module]) -> None:
    """Set `covariance_matrix` (in, in), the mean over run_model's forward calls of x^T x (x: one call's inputs as
    (tokens, in), divided by their maximum), and `sample_count` on each target; from covariance_file if it exists."""
    corda = config.corda_config
    stored = read_tensors(corda.covariance_file, "covariance_file")
    if stored is not None:
        for name, module in targets:
            module.covariance_matrix = _entry(stored, name, corda.covariance_file)
        return
    if run_model is None:
        raise ConfigError(["run_model must be specified when covariance file and cache file aren't built: pass "
                           "run_model=lambda: <run the model over the sample data>"], where="preprocess_corda")
    hooked = model if hooked_model is None else hooked_model
    hooked.eval()
    hooked_targets = targets if hooked is model else corda_targets(hooked, config)
    _run_hooked(hooked_targets, run_model, corda.use_float16_for_covariance)
    if hooked is not model:  # (a layer only the hooked model has is skipped)
        seen = dict(hooked_targets)
        for name, module in targets:
            if name in seen:
                module.sample_count = seen[name].sample_count
                module.covariance_matrix = seen[name].covariance_matrix
    for name, module in targets:
        if not getattr(module, "sample_count", 0):
            raise ConfigError([f"layer {name} saw no input while run_model ran: run the model itself in run_model "
                               "(or name the model run_model runs as hooked_model)"], where="preprocess_corda")
        module.covariance_matrix /= module.sample_count
    if corda.covariance_file is not None:
        write_tensors(corda.covariance_file, {name: module.covariance_matrix for name, module in targets})


def _run_hooked(targets: list[tuple[str, nn.Module]], run_model: Callable[[], object], use_float16: bool) -> None:
    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        x = inputs[0].detach()
        x = x.reshape(-1, x.shape[-1])  # (tokens, in): every row of the call (PEFT squeezes a batch of one)
        if not use_float16:
            x = x.float()
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise ConfigError([f"Invalid value found in input, please check your input data (a forward call "
                               f"gave a layer of shape {tuple(module.weight.shape)} NaN or inf)"],
                              where="preprocess_corda")
        module.sample_count += 1
        module.covariance_matrix = module.covariance_matrix + x.T @ x  # (in, in)

    handles = []
    try:
        for _, module in targets:
            module.sample_count, module.covariance_matrix = 0, 0
            handles.append(module.register_forward_hook(hook))
        run_model()
    finally:
        for handle in handles:
            handle.remove()


def layer_eigens(module: nn.Module) -> CordaEigens:
    """PEFT's collect_eigens_for_layer: the full SVD of W (C + damping), uncropped (min(out, in) components)."""
    w = module.weight.data.float()
    w = w.T if is_conv1d_gpt2(module) else w  # (out, in)
    cov = module.covariance_matrix.float().to(w.device)  # (in, in)
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    for _ in range(MAX_DAMPING_STEPS):
        fixed = cov + torch.diag(torch.ones(cov.shape[0], device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        cov_inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ cov_inv, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise ConfigError([f"the input covariance of a layer of shape {tuple(w.shape)} cannot be inverted even with "
                           "damping: the sample data run by run_model is too small or too repetitive for it"],
                          where="preprocess_corda")
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)  # (out, k), (k,), (k, in)
    return CordaEigens(S_WC=S, U_WC=U, V_WC=(Vh @ cov_inv).T)  # V_WC (in, k)


def crop_eigens(eigens: CordaEigens, method: str, rank: int, name: str) -> CordaEigens:
    """Keep the `rank` largest components ('ipm') or the `rank` smallest ('kpm'), as copies (so a saved cache holds
    only them)."""
    available = eigens.S_WC.shape[0]
    if not 0 < rank <= available:
        raise ConfigError([f"layer {name}: rank {rank} is more than its {available} components (min of its in and "
                           "out features); lower r or its rank_pattern entry"], where="preprocess_corda")
    keep = slice(None, rank) if method == "ipm" else slice(available - rank, None)
    return CordaEigens(S_WC=eigens.S_WC[keep].clone(), U_WC=eigens.U_WC[:, keep].contiguous(),
                       V_WC=eigens.V_WC[:, keep].contiguous())


def read_tensors(path: Optional[str | os.PathLike], what: str) -> Optional[dict[str, torch.Tensor]]:
    """The tensors of a cache or covariance file, or None when `path` is None, missing or empty (PEFT's rule)."""
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped:  # PEFT's torch.save file: tensors only, so torch's restricted loader reads it
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # (pickle errors have no common base class)
            raise ConfigError([f"{what} {os.fspath(path)} is not a tensors-only torch file ({e}); delete it to "
                               "make it again"], where="preprocess_corda") from None
    return load_file(os.fspath(path))


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Write a cache or covariance file as safetensors, atomically."""
    owned = {k: v.detach().contiguous().clone() for k, v in tensors.items()}  # (safetensors refuses shared storage)
    atomic_write(path, lambda tmp: save_file(owned, tmp))


def _entry(tensors: dict[str, torch.Tensor], key: str, path: object) -> torch.Tensor:
    if key not in tensors:
        raise ConfigError([f"{os.fspath(path)} has no entry {key!r}: it was made for another model or other "
                           "target_modules; delete it to make it again"], where="preprocess_corda")
    return tensors[key]
