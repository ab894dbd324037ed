"""Turn pretrained Llama-architecture checkpoints (Llama, SmolLM, SmolLM2) into Mixture-of-Recursions models."""

__all__ = ["convert_llama_to_mor", "INIT_STRATEGIES"]


def __getattr__(name):
    # Lazy, so that `python -m conversion.convert_llama_to_mor` does not import the module twice.
    if name in __all__:
        from . import convert_llama_to_mor as module

        return getattr(module, name)
    raise AttributeError(f"module 'conversion' has no attribute {name!r}")
