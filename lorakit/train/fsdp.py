"""`--fsdp`: shard the model over the processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Every weight, frozen or not, is split into one shard per process; a block's full weights exist only
while that block runs (all-gathered before its forward, freed after). Gradients of the trainable
(LoRA) shards are reduce-scattered by FSDP in the backward pass, so `ProcessGroup.reduce_gradients`
is not used. The optimizer holds only this process's shard of the LoRA state.

The training forward must enter through the outermost sharded module (FSDP2 starts its bookkeeping
there), so the trainer wraps model + loss function in `LossModule` and shards that as the root.
Checkpoints hold full (unsharded) tensors, gathered collectively and written by rank 0, so they
resume on any number of processes with --fsdp.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lorakit.errors import LorakitError


class LossModule(nn.Module):
    """`forward(batch) -> loss`: the model and its loss function as one module (one entry point)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: transformers' `_no_split_modules` classes (decoder
    layers), else the items of the longest `nn.ModuleList`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard(root: LossModule, device: torch.device) -> None:
    """Apply `fully_shard` to every block of `root.model`, then to `root` itself (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torch.distributed as dist

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in block_modules(root.model):
        fully_shard(block, mesh=mesh)
    fully_shard(root, mesh=mesh)


def full_tensor(value: Any) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) DTensor; collective for DTensors: call on every rank."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def full_trainable(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the trainable parameters (collective: every rank calls it)."""
    return {name: full_tensor(param.detach()).cpu().contiguous() for name, param in named}


def load_trainable(named: list[tuple[str, nn.Parameter]], saved: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into sharded parameters: each rank keeps its own shard."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, param in named:
            value = saved[name].to(param.device, param.dtype)
            if hasattr(param, "device_mesh"):
                shard_ = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard_.to_local())
            else:
                param.copy_(value)


def optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state with full tensors, keyed by parameter name (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(root, optimizer, options=options)


def load_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state into the sharded optimizer (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    try:
        set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as err:
        raise LorakitError(f"the checkpoint's optimizer state does not fit this --fsdp run ({err}); "
                           "was it written without --fsdp or for other targets?") from err


def release(root: nn.Module) -> None:
    """Turn the sharded model back into a plain one after training (in place, every rank): every
    weight gathered into an ordinary Parameter, FSDP's hooks removed and each module's own class
    restored, so it is scored and saved like an unsharded model (each process then holds the
    whole model again).

    FSDP2 has no public "un-shard for good"; this uses the handles it keeps for its state-dict
    hooks (which would otherwise turn `state_dict()` back into shards).
    """
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for module in fsdp_modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    with torch.no_grad():  # the gathered weights live in FSDP's buffers: take plain copies
        for module in root.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    module._parameters[name] = nn.Parameter(param.detach().clone(),
                                                            requires_grad=param.requires_grad)
    for module in fsdp_modules:
        state = module._get_fsdp_state()
        for group in state._fsdp_param_groups:
            for handles in (group._module_to_pre_save_state_dict_hook_handle,
                            group._module_to_pre_load_state_dict_hook_handle):
                for handle in handles.values():
                    handle.remove()
        _remove_hooks_of(module, state)
        module.__class__ = next(c for c in type(module).__mro__[1:]
                                if not issubclass(c, FSDPModule))


def _remove_hooks_of(module: nn.Module, owner: Any) -> None:
    """Remove the forward hooks of `module` that are bound methods of `owner`."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is owner]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
