"""The lean recompute: same loss and LoRA gradients as no checkpointing, with exactly the down_proj
base matmuls of the recompute left out."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit import LoraConfig, get_peft_model
from lorakit.fast.recompute import mark_recompute_outputs, recomputing
from lorakit.train.runtime import enable_gradient_checkpointing
from tests.conftest import assert_close, loss_and_grads, tiny_bert, tiny_llama

aten = torch.ops.aten
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_llama(targets=TARGETS):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would hide a wrong branch: give it values
            torch.nn.init.normal_(p, std=0.5)
    return model.train()


class _MatmulFlops(TorchDispatchMode):
    """2·m·k·n summed over every 2-D matmul (mm, addmm, in-place addmm_) run under it."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.mm.default, aten.addmm.default, aten.addmm_.default):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def _measured(model, batch):
    with _MatmulFlops() as counter:
        loss, grads = loss_and_grads(model, batch)
    return loss, grads, counter.flops


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("targets", [TARGETS, ["q_proj", "v_proj"]])
def test_same_loss_and_gradients_with_exactly_the_down_products_skipped(targets, grouped):
    """`grouped`: with use_fast_kernels' q/k/v and gate/up groups, rerun in the recompute as well."""
    from lorakit.fast import use_fast_kernels

    batch = {"input_ids": torch.randint(1, 128, (2, 12)), "labels": torch.randint(1, 128, (2, 12))}
    plain, checkpointed, lean = _lora_llama(targets), _lora_llama(targets), _lora_llama(targets)
    if grouped:
        assert all([use_fast_kernels(m) for m in (plain, checkpointed, lean)])
    plain_loss, plain_grads, _ = _measured(plain, batch)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, _, checkpointed_flops = _measured(checkpointed, batch)
    enable_gradient_checkpointing(lean)
    lean_loss, lean_grads, lean_flops = _measured(lean, batch)

    assert lean_loss == pytest.approx(plain_loss.item(), abs=1e-6)
    assert lean_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert_close(lean_grads[name], plain_grads[name])
    # the recompute leaves out each layer's down_proj output: the base product and the rank-r one onto it
    cfg, tokens = lean.get_base_model().config, batch["input_ids"].numel()
    down = 2 * tokens * cfg.hidden_size * (cfg.intermediate_size + 4)
    skipped = cfg.num_hidden_layers * down if "down_proj" in targets else 0
    assert lean_flops == checkpointed_flops - skipped


def test_only_llama_family_down_projections_are_marked_and_only_inside_the_recompute():
    model = _lora_llama()
    assert mark_recompute_outputs(model) == model.get_base_model().config.num_hidden_layers
    marked = [n for n, m in model.named_modules() if getattr(m, "output_unused_in_recompute", False)]
    assert all(n.endswith("mlp.down_proj") for n in marked)
    bert = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value", "dense"]))
    assert mark_recompute_outputs(bert) == 0  # post-norm layers read their last projection's output
    assert not recomputing()
