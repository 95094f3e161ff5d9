"""lorakit: LoRA fine-tuning for PyTorch and Hugging Face transformers, with PEFT's API.

    from lorakit import LoraConfig, TaskType, get_peft_model, PeftModel
"""
__version__ = "0.1.0"

from .import_noise import silence_import_noise

silence_import_noise()  # before anything imports transformers (and through it torchao)

from .config import CordaConfig, LoftQConfig, LoraConfig, TaskType
from .errors import AdapterError, ConfigError, DataError, LorakitError, ModelLoadError, PeftWarning, TargetError
from .lora.base_state import get_base_model_state_dict, set_base_model_state_dict
from .lora.layer import BASE_ADAPTER
from .lora.low_level import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from .lora.status import get_layer_status, get_model_status
from .peft_model import PeftModel, get_peft_model
from .lora.corda import preprocess_corda  # (after peft_model: lora/ imports in its order)
from .task_models import (PeftMixedModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                          PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                          PeftModelForTokenClassification)

__all__ = ["LoraConfig", "LoftQConfig", "TaskType", "get_peft_model", "PeftModel", "BASE_ADAPTER", "get_layer_status",
           "CordaConfig", "preprocess_corda", "get_model_status", "get_peft_model_state_dict",
           "set_peft_model_state_dict",
           "inject_adapter_in_model", "get_base_model_state_dict", "set_base_model_state_dict", "LorakitError",
           "PeftWarning", "PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
           "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction",
           "PeftMixedModel",
           "ConfigError", "TargetError", "AdapterError", "DataError", "ModelLoadError", "__version__"]
