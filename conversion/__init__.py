"""Turn pretrained Llama-architecture checkpoints (Llama, SmolLM, SmolLM2) into Mixture-of-Recursions models."""

from .convert_llama_to_mor import INIT_STRATEGIES, convert_llama_to_mor


__all__ = ["convert_llama_to_mor", "INIT_STRATEGIES"]
