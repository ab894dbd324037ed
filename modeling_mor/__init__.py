"""Mixture-of-Recursions for Hugging Face Transformers.

Importing this package registers the MoR classes with the Auto factories, so an installed package needs no
`trust_remote_code`. Checkpoints saved with `save_pretrained` carry these files as remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_mor import MoRCache
from .configuration_mor import MoRConfig, valid_recursion_layouts
from .modeling_mor import MoRForCausalLM, MoRModel, MoRPreTrainedModel


AutoConfig.register("mor", MoRConfig, exist_ok=True)
AutoModel.register(MoRConfig, MoRModel, exist_ok=True)
AutoModelForCausalLM.register(MoRConfig, MoRForCausalLM, exist_ok=True)
# save_pretrained writes an `auto_map` and copies the model files next to the weights.
MoRConfig.register_for_auto_class()
MoRModel.register_for_auto_class("AutoModel")
MoRForCausalLM.register_for_auto_class("AutoModelForCausalLM")

# PEFT's default LoRA targets for model_type "mor" (Llama's), so that LoraConfig() works without target_modules.
try:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
except ImportError:
    pass
else:
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("mor", ["q_proj", "v_proj"])

__all__ = ["MoRConfig", "MoRPreTrainedModel", "MoRModel", "MoRForCausalLM", "MoRCache", "valid_recursion_layouts"]
