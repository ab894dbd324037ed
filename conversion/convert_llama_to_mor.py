"""Convert a pretrained `LlamaForCausalLM` into an `MoRForCausalLM` (MOR_SPEC section 5).

Each shared layer of the recursion block is initialized from the pretrained layers that will be tied to it
("stepwise", "average", "lower", "upper" or "random"); the unshared first and last layers of the middle_* strategies,
the embeddings, the final norm and the LM head are copied as they are. Routers start at zero, and conversions use the
"update" gating by default, so that a token routed to full depth computes exactly what the tied recursive Llama does.

Example:

```python
from transformers import LlamaForCausalLM
from conversion import convert_llama_to_mor

llama = LlamaForCausalLM.from_pretrained("path/to/llama")
mor = convert_llama_to_mor(llama, num_recursions=3, sharing_strategy="middle_cycle")
```
"""

import random

import torch
from transformers import LlamaForCausalLM

from modeling_mor import MoRConfig, MoRForCausalLM, valid_recursion_layouts


INIT_STRATEGIES = ("stepwise", "average", "lower", "upper", "random")


def _source_layer_indices(tied_groups: list[list[int]], init_strategy: str, seed: int) -> list[list[int]]:
    """For each shared layer, the pretrained layers its weights are initialized from (averaged when several)."""
    recursed = sorted(index for group in tied_groups for index in group)
    num_shared = len(tied_groups)
    if init_strategy == "average":
        return tied_groups
    if init_strategy == "stepwise":
        step = len(recursed) // num_shared
        return [[recursed[position * step]] for position in range(num_shared)]
    if init_strategy == "lower":
        return [[index] for index in recursed[:num_shared]]
    if init_strategy == "upper":
        return [[index] for index in recursed[-num_shared:]]
    chosen = sorted(random.Random(seed).sample(recursed, num_shared))
    return [[index] for index in chosen]


def _init_relaxation(mor: MoRForCausalLM, source_layers) -> None:
    """Each shared layer's delta for step r starts as the truncated SVD of (the source layer that sits at that
    unrolled position - the shared weight), so that at full rank every position computes its source layer again."""
    for unrolled_index, (layer, recursion_step) in enumerate(mor.model.unrolled_layers(with_recursion_step=True)):
        if recursion_step is None:
            continue
        source_layer = source_layers[unrolled_index]
        for name, module in layer.named_modules():
            if hasattr(module, "init_from_target"):
                source = source_layer.get_submodule(name)
                if isinstance(source, torch.nn.Linear):
                    module.init_from_target(recursion_step, source.weight, source.bias)
                else:
                    module.init_from_target(recursion_step, source.weight)


@torch.no_grad()
def convert_llama_to_mor(
    model: LlamaForCausalLM,
    *,
    num_recursions: int,
    sharing_strategy: str,
    init_strategy: str = "stepwise",
    routing: str = "expert_choice",
    seed: int = 0,
    **config_overrides,
) -> MoRForCausalLM:
    """Returns a new `MoRForCausalLM` initialized from `model` (which is left untouched).

    `config_overrides` set any other `MoRConfig` field (for example `kv_cache_policy`, `capacity`, `gating`,
    `relaxation_rank`: with it, the per-step deltas start from the SVD of the tied layers' differences).
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(
            f"convert_llama_to_mor takes a LlamaForCausalLM (Llama, SmolLM and SmolLM2 checkpoints load as one), "
            f"got {type(model).__name__}."
        )
    if init_strategy not in INIT_STRATEGIES:
        raise ValueError(f"init_strategy={init_strategy!r} is not valid; choose one of {', '.join(INIT_STRATEGIES)}.")
    source_config = model.config
    num_layers = source_config.num_hidden_layers
    layouts = valid_recursion_layouts(num_layers)
    if num_recursions > 1 and (sharing_strategy, num_recursions) not in layouts:
        raise ValueError(
            f"A {num_layers}-layer model cannot be converted with sharing_strategy={sharing_strategy!r} and "
            f"num_recursions={num_recursions}. Valid (sharing_strategy, num_recursions) pairs for it: "
            f"{', '.join(f'({s!r}, {n})' for s, n in layouts) or 'none'}."
        )

    config_fields = source_config.to_dict()
    for field in ("architectures", "model_type", "transformers_version", "auto_map", "dtype", "torch_dtype"):
        config_fields.pop(field, None)
    config_fields.update(
        num_recursions=num_recursions,
        sharing_strategy=sharing_strategy,
        routing=routing,
        gating="update",
        architectures=["MoRForCausalLM"],
    )
    config_fields.update(config_overrides)
    config = MoRConfig(**config_fields)
    config._attn_implementation = source_config._attn_implementation
    mor = MoRForCausalLM(config).to(dtype=model.dtype, device=model.device)

    source_layers = model.model.layers
    unrolled = mor.model.unrolled_layers()
    tied_groups: dict[int, list[int]] = {}
    modules = {}
    for unrolled_index, module in enumerate(unrolled):
        tied_groups.setdefault(id(module), []).append(unrolled_index)
        modules[id(module)] = module
    ends = {id(unrolled[0]), id(unrolled[-1])} if config.has_unshared_ends else set()
    shared_keys = [key for key in tied_groups if key not in ends]
    sources = _source_layer_indices([tied_groups[key] for key in shared_keys], init_strategy, seed)
    for key in ends:
        sources_for_end = tied_groups[key]
        modules[key].load_state_dict(source_layers[sources_for_end[0]].state_dict())
    for key, source_indices in zip(shared_keys, sources):
        states = [source_layers[index].state_dict() for index in source_indices]
        averaged = {name: torch.stack([state[name] for state in states]).mean(0) for name in states[0]}
        # strict=False: a relaxed layer also has its per-step deltas, initialized below.
        modules[key].load_state_dict(averaged, strict=False)

    if config.relaxation_rank > 0:
        _init_relaxation(mor, source_layers)

    mor.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    mor.model.norm.load_state_dict(model.model.norm.state_dict())
    mor.lm_head.load_state_dict(model.lm_head.state_dict())
    # Routers start at zero: the gate of a zero logit is neutral under the "update" gating.
    for router in mor.routers():
        router.zero_output_()
    return mor
