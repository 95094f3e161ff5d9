"""PEFT's per-task model classes (PeftModelForCausalLM, ...) under their names: each is lorakit's PeftModel, whose
forward and generate already pass every argument through to the wrapped transformers model, so the task decides
nothing here but the class. get_peft_model returns the class of the config's task_type, as PEFT does, so
`isinstance(model, PeftModelForCausalLM)` and `PeftModelForCausalLM.from_pretrained(base, path)` work as in PEFT."""
from __future__ import annotations

from typing import Optional

from .config import TaskType
from .peft_model import PeftModel


class PeftModelForCausalLM(PeftModel):
    """A decoder language model with LoRA (task_type CAUSAL_LM)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """An encoder-decoder model with LoRA (task_type SEQ_2_SEQ_LM)."""


class PeftModelForSequenceClassification(PeftModel):
    """A sequence classifier with LoRA; its new head trains in full and is saved (task_type SEQ_CLS)."""


class PeftModelForTokenClassification(PeftModel):
    """A token classifier with LoRA; its new head trains in full and is saved (task_type TOKEN_CLS)."""


class PeftModelForQuestionAnswering(PeftModel):
    """An extractive question-answering model with LoRA; its span head trains in full (task_type QUESTION_ANS)."""


class PeftModelForFeatureExtraction(PeftModel):
    """An encoder producing features (embeddings) with LoRA (task_type FEATURE_EXTRACTION)."""


class PeftMixedModel(PeftModel):
    """PEFT's model for adapters of several types at once (get_peft_model(..., mixed=True)). lorakit's adapters are
    all LoRA, and PeftModel already runs several of them together (set_adapter([...]) sums the active ones), so a
    mixed model is a PeftModel under PEFT's name."""


TASK_MODEL_CLASSES: dict[TaskType, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}
"""PEFT's MODEL_TYPE_TO_PEFT_MODEL_MAPPING; other task types (and None) get PeftModel."""


def model_class_for(task_type: Optional[TaskType | str], mixed: bool = False) -> type[PeftModel]:
    """The PeftModel class get_peft_model builds for a config's task_type (PeftMixedModel when `mixed`)."""
    if mixed:
        return PeftMixedModel
    try:
        return TASK_MODEL_CLASSES.get(TaskType(task_type), PeftModel) if task_type is not None else PeftModel
    except ValueError:  # a task type PEFT has and lorakit does not name: the general class
        return PeftModel
