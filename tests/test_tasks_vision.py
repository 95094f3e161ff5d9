"""Image classification with LoRA (lorakit.tasks.vision) on tiny random ViT and ResNet models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError, TargetError
from lorakit.lora.conv_layer import LoraConv2d
from lorakit.lora.layer import LoraConv, LoraLinear
from lorakit.tasks.vision import (collate_images, default_image_targets, freeze_norm_statistics,
                                  image_accuracy, image_examples, image_lora_config, predict_images,
                                  to_pixel_values, train_image_classifier)
from tests.conftest import assert_close


def tiny_vit(seed: int = 0, num_labels: int = 4):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=num_labels)
    return ViTForImageClassification(cfg).eval()


def tiny_resnet(seed: int = 0, num_labels: int = 4):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=num_labels)
    return ResNetForImageClassification(cfg).eval()


def toy_images(n: int = 32, seed: int = 0):
    """(n, 3, 16, 16) pixel values whose class (0-3) is which quadrant is bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.rand(n, 16, 16, generator=g) * 0.2
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        images[i, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 0.8
    return to_pixel_values(images.numpy(), channels=3, max_value=1.0), labels


def logits(model, pixels):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixels).logits


# --- pixel values ---------------------------------------------------------------------------

def test_pixel_values_scale_resize_and_channels():
    digits = np.zeros((2, 8, 8), dtype=np.int64)
    digits[1] = 16
    pixels = to_pixel_values(digits, size=32, channels=3, max_value=16)
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    assert torch.all(pixels[0] == -1) and torch.all(pixels[1] == 1)  # (x - 0.5) / 0.5
    rgb = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    rgb[0, 1, 2] = (255, 0, 51)  # channels last: one reddish pixel at row 1, column 2
    out = to_pixel_values(rgb, mean=0.0, std=1.0)
    assert out.shape == (1, 3, 4, 4)
    assert out[0, :, 1, 2].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert to_pixel_values(rgb, mean=[0.0, 0.0, 0.1], std=[1.0, 1.0, 0.5])[0, 2, 1, 2] == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="3 channels but the model wants 1"):
        to_pixel_values(rgb, channels=1)
    with pytest.raises(ConfigError, match="shape"):
        to_pixel_values(np.zeros((2, 3)))


def test_examples_and_collate():
    pixels, labels = toy_images(6)
    batch = collate_images(image_examples(pixels, labels)[:4])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="6 images but 5 labels"):
        image_examples(pixels, labels[:5])


# --- ViT: linear (attention) and Conv2d (patch projection) targets --------------------------

def test_vit_targets_head_training_and_round_trip(tmp_path):
    base = tiny_vit()
    assert default_image_targets(base) in (["q_proj", "v_proj"], ["query", "value"])
    targets = default_image_targets(base) + ["projection"]  # the patch embedding is an nn.Conv2d
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                            task_type="IMAGE_CLASSIFICATION"))
    kinds = {type(m) for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraConv))}
    assert kinds == {LoraLinear, LoraConv2d}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier.modules_to_save" in n for n in trainable)  # the new head trains
    assert all("lora_" in n or "classifier.modules_to_save" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    pixels, labels = toy_images(32)
    batch = collate_images(image_examples(pixels, labels))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses
    assert image_accuracy(model, pixels, labels) > 0.5
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in saved  # PEFT's key for a modules_to_save head
    assert any("projection.lora_A" in k for k in saved) and any("lora_B" in k for k in saved)
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    assert_close(logits(loaded, pixels), logits(model, pixels))
    assert torch.equal(predict_images(loaded, pixels, batch_size=5), predict_images(model, pixels))


def test_vit_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT is a test dependency (pip install -e .[test])")
    base = tiny_vit()
    model = get_peft_model(base, image_lora_config(base, r=4, lora_alpha=8, init_lora_weights=False))
    with torch.no_grad():  # a head that differs from the base's, so the test sees whether it loads
        for p in model.base_model.model.classifier.modules_to_save.parameters():
            p.add_(0.5)
    pixels, _ = toy_images(8)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path))
    assert_close(logits(theirs, pixels), logits(model, pixels))
    assert rel_change(logits(tiny_vit(), pixels), logits(model, pixels)) > 1e-2


def test_image_classification_task_type_adapter_loads_in_peft_and_back(tmp_path):
    import json

    peft = pytest.importorskip("peft", reason="PEFT is a test dependency (pip install -e .[test])")
    base = tiny_vit()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=default_image_targets(base),
                                            init_lora_weights=False, task_type="IMAGE_CLASSIFICATION"))
    with torch.no_grad():
        for p in model.base_model.model.classifier.modules_to_save.parameters():
            p.add_(0.5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] == ["classifier"]  # as PEFT reads them
    pixels, _ = toy_images(8)
    assert_close(logits(peft.PeftModel.from_pretrained(tiny_vit(), str(tmp_path)), pixels), logits(model, pixels))
    ours = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    assert ours.peft_config["default"].task_type == "IMAGE_CLASSIFICATION"
    assert_close(logits(ours, pixels), logits(model, pixels))


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- ResNet: Conv2d targets, batch norm left alone ------------------------------------------

def test_resnet_conv_lora_with_trainer_keeps_batch_norm_statistics(tmp_path):
    base = tiny_resnet()
    targets = default_image_targets(base)
    assert targets and all(n.endswith("convolution") for n in targets)
    model = get_peft_model(base, image_lora_config(base, r=4, lora_alpha=8))
    assert all(isinstance(model.base_model.model.get_submodule(n), LoraConv) for n in targets)
    base_state = {n: t.detach().clone() for n, t in model.state_dict().items()
                  if "lora_" not in n and "modules_to_save" not in n}
    pixels, labels = toy_images(32)
    before = torch.nn.functional.cross_entropy(logits(model, pixels), labels).item()
    result = train_image_classifier(model, image_examples(pixels, labels), tmp_path / "run",
                                    epochs=6, batch_size=8, lr=1e-2)
    assert result.steps == 24 and (tmp_path / "run" / "metrics.jsonl").is_file()
    after = torch.nn.functional.cross_entropy(logits(model, pixels), labels).item()
    assert after < 0.7 * before, (before, after)
    for name, tensor in model.state_dict().items():  # weights *and* running statistics
        if name in base_state:
            assert torch.equal(tensor, base_state[name]), f"{name} changed"
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_resnet(), tmp_path / "adapter")
    assert_close(logits(loaded, pixels), logits(model, pixels))


def test_freeze_norm_statistics_only_touches_frozen_layers():
    model = tiny_resnet().train()
    norms = freeze_norm_statistics(model)
    assert norms == []  # a fully trainable model keeps its batch norms training
    for p in model.parameters():
        p.requires_grad_(False)
    norms = freeze_norm_statistics(model)
    assert norms and all(not m.training for m in norms)


def test_unknown_model_type_needs_explicit_targets():
    with pytest.raises(TargetError, match="pass target_modules"):
        default_image_targets(torch.nn.Linear(2, 2))


def test_digits_example_runs_and_reloads_its_adapter(tmp_path, capsys):
    """examples/vision_digits.py, cut to a fraction of an epoch per phase: it runs, prints its
    table, and the saved adapter reloads onto a fresh base with the same accuracy."""
    pytest.importorskip("sklearn", reason="the digits example needs scikit-learn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "vision_digits.py"
    spec = importlib.util.spec_from_file_location("vision_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    figures = example.main(["--base-epochs", "0.2", "--lora-epochs", "0.1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "LoRA q,v + head" in printed and "head only (frozen ViT)" in printed
    assert figures["reloaded_accuracy"] == figures["lora_accuracy"]
    assert 0 < figures["trainable_params"] < 0.1 * figures["total_params"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
