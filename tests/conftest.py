"""Shared fixtures: tiny deterministic models and one tolerance table per dtype."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():  # the Triton kernels' tests run them on CPU through Triton's interpreter,
    os.environ.setdefault("TRITON_INTERPRET", "1")  # which must be chosen before triton is first imported

# `--dtype auto` trains in bf16 on a CPU with native bf16 (lorakit.train.runtime.training_dtype): the suite keeps
# fp32 so its figures do not depend on the CPU; tests/test_cpu_bf16.py covers the bf16 choice and path.
os.environ.setdefault("LORAKIT_CPU_BF16", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Relative error allowed between two computations of the same function, by dtype (one table, not ad hoc).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    err = rel_err(a, b)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3g} > {TOLERANCE[dtype]:.1g} for {dtype}"


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`model(**batch).loss` and the gradient of every trainable parameter after its backward."""
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def tiny_llama(task: str = "causal", seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, pad_token_id=0, num_labels=3, **overrides)
    cls = LlamaForSequenceClassification if task == "seq_cls" else LlamaForCausalLM
    return cls(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(task: str = "seq_cls", seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=128, max_position_embeddings=64, num_labels=2)
    return (BertForSequenceClassification(cfg) if task == "seq_cls" else BertModel(cfg)).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=128,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


class ToyNet(nn.Module):
    """An MLP + conv + embedding model covering every layer type LoRA supports."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 + 6, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, ids, image):
        e = self.emb(ids)  # (b, seq, 8)
        e = self.conv1d(e.transpose(1, 2)).mean(-1)  # (b, 8)
        c = self.conv(image).mean((-1, -2))  # (b, 6)
        return self.fc2(torch.relu(self.fc1(torch.cat([e, c], -1))))


@pytest.fixture
def toy_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (4, 5), generator=g), torch.randn(4, 3, 6, 6, generator=g)
