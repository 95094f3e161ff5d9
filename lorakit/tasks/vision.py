"""Image classification with LoRA (TaskType.IMAGE_CLASSIFICATION), used from Python.

    pixels = to_pixel_values(images, size=32, channels=3, max_value=255)   # (n, 3, 32, 32)
    model = get_peft_model(vit, LoraConfig(task_type="IMAGE_CLASSIFICATION",
                                           target_modules=default_image_targets(vit)))
    result = train_image_classifier(model, image_examples(pixels, labels), "runs/vit")
    print(image_accuracy(model, test_pixels, test_labels))

Works with transformers' ViT (LoRA on the attention projections, nn.Linear) and ResNet (LoRA on the
convolutions, nn.Conv2d). With task_type IMAGE_CLASSIFICATION the new head (`classifier`) trains
in full and is saved with the adapter, as PEFT's modules_to_save does.

Batch norm: a frozen ResNet's BatchNorm layers would still update their running statistics in
train mode, silently changing the base model (and the adapter would no longer reproduce its
outputs on a fresh base). `train_image_classifier` keeps every frozen BatchNorm layer in eval
mode; call `freeze_norm_statistics` yourself in a loop of your own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError, TargetError

Number = Union[float, Sequence[float]]


# --- images → tensors -----------------------------------------------------------------------

def to_pixel_values(images: Any, *, size: Optional[int] = None, channels: Optional[int] = None,
                    max_value: Optional[float] = None, mean: Number = 0.5, std: Number = 0.5,
                    channels_last: bool = True) -> torch.Tensor:
    """A batch of images as the normalized float tensor image models take.

    Args:
        images: array-like (numpy, torch, nested lists) of shape (n, h, w) for grayscale, or
            (n, h, w, c) (channels last, as numpy/PIL images are); (n, c, h, w) with
            channels_last=False.
        size: resize (bilinear) to size x size; None keeps the size.
        channels: the channels the model expects; grayscale is repeated to fill them.
        max_value: the value of full intensity: None = 255 for integer arrays, 1.0 for floats.
            (scikit-learn's digits go up to 16.)
        mean, std: per-channel (or one) normalization after scaling to [0, 1]: (x - mean) / std.
            0.5 / 0.5 is what transformers' ViT image processor uses.

    Returns:
        float32 tensor (n, channels, size, size).

    Raises:
        ConfigError: a shape or channel count that cannot be read or converted.
    """
    array = torch.as_tensor(np.asarray(images))
    if max_value is None:
        max_value = 1.0 if array.is_floating_point() else 255.0
    x = array.float() / float(max_value)
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (n, 1, h, w)
    elif x.dim() == 4 and channels_last:
        x = x.permute(0, 3, 1, 2)  # (n, h, w, c) -> (n, c, h, w)
    elif x.dim() != 4:
        raise ConfigError(f"images must have shape (n, h, w) or (n, h, w, c), got {tuple(array.shape)}",
                          where="to_pixel_values")
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] != 1:
            raise ConfigError(f"images have {x.shape[1]} channels but the model wants {channels}; "
                              "only grayscale (1 channel) is converted", where="to_pixel_values")
        x = x.expand(-1, channels, -1, -1)  # (n, channels, h, w)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)  # (c or 1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def image_examples(pixel_values: torch.Tensor, labels: Sequence[int]) -> list[dict]:
    """Per-image examples `{"pixel_values": (c, h, w), "labels": int}` for `collate_images`."""
    if len(pixel_values) != len(labels):
        raise ConfigError(f"{len(pixel_values)} images but {len(labels)} labels", where="image_examples")
    return [{"pixel_values": pixel_values[i], "labels": int(label)} for i, label in enumerate(labels)]


def collate_images(examples: list[dict]) -> dict[str, torch.Tensor]:
    """`pixel_values` (batch, c, h, w) and `labels` (batch,): what `model(**batch).loss` takes."""
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}


# --- which layers get LoRA ------------------------------------------------------------------

_ATTENTION_NAMES = (("q_proj", "v_proj"), ("query", "value"))  # transformers >= 5, older


def default_image_targets(model: nn.Module) -> list[str]:
    """LoRA targets for an image classifier: ViT's query and value projections (whichever names
    this transformers version uses), or every convolution of a ResNet's residual stages.

    Raises:
        TargetError: a model type without a rule here; pass target_modules yourself.
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    names = [n for n, _ in model.named_modules()]
    if kind == "vit":
        for pair in _ATTENTION_NAMES:
            if any(n.endswith("." + pair[0]) for n in names):
                return list(pair)
    if kind == "resnet":
        return [n for n, m in model.named_modules()
                if isinstance(m, nn.Conv2d) and ".encoder.stages." in n]
    raise TargetError(f"no default image targets for model type {kind!r}; pass target_modules "
                      "(linear or Conv2d layer names, or 'all-linear')")


def image_lora_config(model: nn.Module, r: int = 8, lora_alpha: float = 16,
                      target_modules: Union[list[str], str, None] = None, head: str = "classifier",
                      **fields: Any):
    """A LoraConfig for fine-tuning an image classifier that PEFT can load too.

    The head is named in `modules_to_save` (as PEFT's image-classification guide does) rather
    than implied by task_type IMAGE_CLASSIFICATION: PEFT (0.21) has no such task type and refuses
    an adapter_config.json that names it. Within lorakit both spellings train and save the head.

    Args:
        target_modules: None = `default_image_targets(model)`.
        head: the new classification head to train in full and save.
        fields: further LoraConfig fields (lora_dropout, use_rslora, ...).
    """
    from lorakit.config import LoraConfig

    targets = default_image_targets(model) if target_modules is None else target_modules
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, modules_to_save=[head],
                      **fields)


# --- training and scoring -------------------------------------------------------------------

def freeze_norm_statistics(model: nn.Module) -> list[nn.Module]:
    """Put every BatchNorm layer whose parameters are all frozen into eval mode, so training
    leaves its running mean and variance alone. Returns those layers; call again after each
    `model.train()`."""
    frozen = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
                not any(p.requires_grad for p in module.parameters()):
            module.eval()
            frozen.append(module)
    return frozen


def train_image_classifier(model: nn.Module, train_examples: Sequence[dict],
                           run_dir: Union[str, Path], *, eval_examples: Optional[Sequence[dict]] = None,
                           epochs: float = 3, batch_size: int = 32, lr: float = 1e-3,
                           seed: int = 0, progress: bool = False, **options: Any):
    """Train the trainable parameters (LoRA + head) with lorakit's Trainer.

    Args:
        model: an image classifier returning `.loss` for `pixel_values` + `labels`.
        train_examples, eval_examples: from `image_examples`.
        run_dir: where metrics.jsonl, the loss plot and the final checkpoint go.
        epochs, batch_size, lr, seed: as in `lorakit train`; `options` are further TrainConfig
            fields (lr_schedule, warmup_ratio, weight_decay, ...).

    Returns:
        The Trainer's `TrainResult` (steps, seconds, final loss ...).
    """
    from lorakit.train.batching import count_examples
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import Trainer

    name = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    config = TrainConfig(model=name, task="seq-cls", epochs=epochs, batch_size=batch_size, lr=lr,
                         seed=seed, eval_every=0, save_every=0, keep_checkpoints=1,
                         out=str(run_dir), **options)

    def loss_fn(module: nn.Module, batch: dict) -> torch.Tensor:
        if module.training:  # the Trainer switches to train mode; frozen statistics stay put
            freeze_norm_statistics(module)
        return module(**batch).loss

    trainer = Trainer(model, train_examples, collate_images, config, run_dir,
                      eval_data=eval_examples, count_loss_units=count_examples,
                      progress=progress, loss_fn=loss_fn)
    return trainer.fit()


@torch.no_grad()
def predict_images(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The predicted class of every image: a (n,) long tensor."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    try:
        for first in range(0, len(pixel_values), batch_size):
            logits = model(pixel_values=pixel_values[first:first + batch_size].to(device)).logits
            predictions.append(logits.argmax(-1).cpu())  # (batch,)
    finally:
        model.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def image_accuracy(model: nn.Module, pixel_values: torch.Tensor, labels: Sequence[int],
                   batch_size: int = 256) -> float:
    """The fraction (0-1) of images whose predicted class is the label."""
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(labels_t) == 0:
        raise ConfigError("no images to score", where="image_accuracy")
    return float((predict_images(model, pixel_values, batch_size) == labels_t).float().mean())
