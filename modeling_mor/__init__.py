"""Mixture-of-Recursions for Hugging Face Transformers.

Importing this package registers the MoR classes with the Auto factories, so an installed package needs no
`trust_remote_code`. Checkpoints saved with `save_pretrained` carry these files as remote code.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .configuration_mor import MoRConfig, valid_recursion_layouts
from .modeling_mor import (  # first of the model files: it checks the transformers version they need
    MoRForCausalLM,
    MoRForQuestionAnswering,
    MoRForSequenceClassification,
    MoRForTokenClassification,
    MoRModel,
    MoRPreTrainedModel,
)
from .cache_mor import MoRCache


# Every Auto class a MoR checkpoint loads through, and the MoR class it builds.
AUTO_CLASSES = {
    AutoModel: MoRModel,
    AutoModelForCausalLM: MoRForCausalLM,
    AutoModelForSequenceClassification: MoRForSequenceClassification,
    AutoModelForTokenClassification: MoRForTokenClassification,
    AutoModelForQuestionAnswering: MoRForQuestionAnswering,
}

AutoConfig.register("mor", MoRConfig, exist_ok=True)
# save_pretrained writes an `auto_map` and copies the model files next to the weights.
MoRConfig.register_for_auto_class()
for auto_class, model_class in AUTO_CLASSES.items():
    auto_class.register(MoRConfig, model_class, exist_ok=True)
    model_class.register_for_auto_class(auto_class.__name__)

# PEFT's default LoRA targets for model_type "mor" (Llama's), so that LoraConfig() works without target_modules.
# PEFT's SEQ_CLS task needs nothing more: its default `modules_to_save` ("classifier", "score") names the head.
try:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
except ImportError:
    pass
else:
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("mor", ["q_proj", "v_proj"])

__all__ = [
    "MoRConfig",
    "MoRPreTrainedModel",
    "MoRModel",
    "MoRForCausalLM",
    "MoRForSequenceClassification",
    "MoRForTokenClassification",
    "MoRForQuestionAnswering",
    "MoRCache",
    "valid_recursion_layouts",
]
