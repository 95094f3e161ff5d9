"""Divergence that stays finite: a run whose numbers never turn NaN can still be lost.

A learning rate far too high drives the LoRA factors to huge values; the activations saturate, the
gradient becomes exactly zero and the loss sits flat (or climbs) while every figure is finite. The NaN
check never fires and the run ends "successfully". `DivergenceWatch` looks at each optimizer step for
three signs, each held for a few steps so one odd batch does not count:

- the gradient norm is exactly 0.0 while there is loss to learn from (saturated or dead);
- the trainable weights' norm grew past GROWTH times its size at the first step (factors exploding);
- the loss stays above RISE times its early level plus one nat (the run is getting worse, not better).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

PATIENCE = 3
"""Steps in a row a sign must hold."""
GROWTH = 100.0
"""Weight norm / its first-step value that counts as exploding (a healthy LoRA run stays within ~10x)."""
RISE = 2.0
"""Loss / its early level (the lowest of the first EARLY steps) that counts as diverging, with 1 nat added."""
EARLY = 3


@dataclass
class DivergenceWatch:
    """Feed it every optimizer step (`observe`); it returns a message once the run has diverged."""

    params: Sequence[torch.Tensor]
    early_losses: list[float] = field(default_factory=list)
    first_norm: Optional[float] = None
    streaks: dict[str, int] = field(default_factory=dict)

    def observe(self, step: int, loss: float, grad_norm: float) -> Optional[str]:
        """The reason the run has diverged as of this step, or None."""
        if len(self.early_losses) < EARLY:
            self.early_losses.append(loss)
        norm = self.weight_norm()
        if self.first_norm is None:
            self.first_norm = norm
        early = min(self.early_losses)  # (not their mean: a loss that explodes within the first steps)
        signs = {
            "zero_grad": grad_norm == 0.0 and loss > 0.0,
            "growth": self.first_norm > 0 and norm > GROWTH * self.first_norm,
            "rise": len(self.early_losses) == EARLY and loss > RISE * early + 1.0,
        }
        for name, present in signs.items():
            self.streaks[name] = self.streaks.get(name, 0) + 1 if present else 0
        held = [name for name in signs if self.streaks[name] >= PATIENCE]
        if not held:
            return None
        facts = {"zero_grad": f"the gradient norm has been exactly 0 for {self.streaks['zero_grad']} steps "
                              f"with the loss at {loss:.4g} (saturated: nothing is learned any more)",
                 "growth": f"the trainable weights' norm is {norm:.3g}, {norm / max(self.first_norm, 1e-30):.3g}x "
                           "its value at the first step (the LoRA factors are exploding)",
                 "rise": f"the loss is {loss:.4g}, above {RISE:g}x its early level {early:.4g} + 1 for "
                         f"{self.streaks['rise']} steps (it is getting worse, not better)"}
        return f"the run diverged by step {step}: " + "; ".join(facts[name] for name in held)

    def weight_norm(self) -> float:
        """L2 norm over all trainable tensors (this process's shards under FSDP)."""
        with torch.no_grad():
            squares = sum(float(p.detach().float().pow(2).sum()) for p in self.params)
        return math.sqrt(squares)
