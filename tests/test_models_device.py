"""resolve_device / resolve_dtype: the words users type become torch objects, or a clear ConfigError."""
from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.models import DTYPE_CHOICES, resolve_device, resolve_dtype
from lorakit.models import device as device_module


def test_cpu_and_torch_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_falls_back_to_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", "auto") is torch.float32


def test_auto_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


@pytest.mark.parametrize("word", ["gpu", "cuda:x", "tpu", ""])
def test_unknown_device_lists_choices(word):
    with pytest.raises(ConfigError) as info:
        resolve_device(word)
    for choice in ("auto", "cpu", "cuda", "mps"):
        assert choice in str(info.value)


def test_missing_hardware_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="MPS is not available"):
        resolve_device("mps")


def test_cuda_index_beyond_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("word, expected", [
    ("fp32", torch.float32), ("float32", torch.float32), ("FP32", torch.float32),
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("fp16", torch.float16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16),
])
def test_dtype_words(word, expected):
    assert resolve_dtype(word, "cpu") is expected


def test_auto_dtype_per_device(monkeypatch):
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float32
    with pytest.raises(ConfigError, match="does not support bfloat16"):
        resolve_dtype("bf16", torch.device("cuda"))


@pytest.mark.parametrize("bad", ["int8", "fp64", "half-ish", torch.int64])
def test_unknown_dtype_lists_choices(bad):
    with pytest.raises(ConfigError) as info:
        resolve_dtype(bad, "cpu")
    for choice in DTYPE_CHOICES:
        assert choice in str(info.value)
