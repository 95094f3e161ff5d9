"""transformers' `Trainer` for lorakit models: checkpoints hold the adapters, as PEFT's do.

transformers writes adapter files only for PEFT's own classes; for any other model it saves the whole
state dict, which fails on tied embeddings (SmolLM2, Llama 3.2) and costs the full model per checkpoint.
`AdapterTrainer` writes each adapter (PEFT's folder layout: 'default' at the root, others in sub-folders)
and loads them back in place on `resume_from_checkpoint` and `load_best_model_at_end`. It also finds the
wrapped model's label names, as transformers does for PEFT's models, so evaluation reports eval_loss.

    from lorakit.train.hf_trainer import AdapterTrainer
    AdapterTrainer(model=peft_model, args=TrainingArguments(...), train_dataset=data).train()
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from ..errors import AdapterError
from ..lora.files import CONFIG_NAME, WEIGHTS_NAME, load_into, read_adapter_tensors
from ..peft_model import PeftModel


class AdapterTrainer(transformers.Trainer):
    """`transformers.Trainer` whose checkpoints are a lorakit model's adapters; any other model is saved
    and loaded as the plain Trainer does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        model = self._lorakit_model()
        if model is not None:  # transformers reads these off the class; PEFT's it unwraps, so do the same
            base = type(model.get_base_model())
            if self.args.label_names is None:
                self.label_names = find_labels(base)  # without them evaluation reports no eval_loss
            self.can_return_loss = can_return_loss(base)

    def _lorakit_model(self, model: Optional[torch.nn.Module] = None) -> Optional[PeftModel]:
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = self._lorakit_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        # unconverted: PiSSA/OLoRA factors resume onto the same residual base the run started from
        model.save_pretrained(output_dir, convert_to_lora=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        peft_model = self._lorakit_model(model)
        if peft_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapters(peft_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        model = self._lorakit_model()
        if model is None or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        load_adapters(model, self.state.best_model_checkpoint)


def load_adapters(model: PeftModel, checkpoint: str | os.PathLike) -> None:
    """Copy the adapters saved in a checkpoint folder into `model`'s adapters of the same names, in place
    (the optimizer keeps its parameters). Every adapter the model has must be in the folder."""
    checkpoint = Path(checkpoint)
    folders = {name: checkpoint if name == "default" else checkpoint / name for name in model.peft_config}
    absent = [f"{name} ({folder / WEIGHTS_NAME})" for name, folder in folders.items()
              if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file()]
    if absent:
        raise AdapterError(f"checkpoint {checkpoint} lacks adapter(s) {', '.join(absent)}; it was not written by "
                           "AdapterTrainer for this model. Resume from a checkpoint of the same run, or start over")
    for name, folder in folders.items():
        load_into(model.base_model.model, name, read_adapter_tensors(folder), model.peft_config[name].bias,
                  str(folder))
