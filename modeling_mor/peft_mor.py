"""PEFT (LoRA) helpers for MoR models.

The shared layers of the recursion block are ordinary modules that the recursion loop applies `num_recursions` times,
so a LoRA adapter on `model.recursion_block.layers.0.self_attn.q_proj` is ONE adapter that serves every recursion
step: a MoR model gets one LoRA module per unique layer and projection, not one per unrolled layer. Target the
projections by their Llama names, as for a Llama model:

```python
from peft import LoraConfig, get_peft_model
from modeling_mor.peft_mor import DEFAULT_LORA_TARGET_MODULES, check_lora_target_modules, router_linear_names

target_modules = [*DEFAULT_LORA_TARGET_MODULES, *router_linear_names(model)]  # routers are optional
check_lora_target_modules(model, target_modules)  # a clear error for a name that matches nothing
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules, task_type="CAUSAL_LM"))
```

The routers are small Linear scorers (`model.recursion_block.routing.routers.{r}.scorer`, and the auxiliary routers'
`...auxiliary_routers.{r}.scorer`). Give them LoRA adapters (their names in `target_modules`), or train them fully
(their names in `modules_to_save`: hidden_size weights per linear router). A converted checkpoint that was not
uptrained needs one of the two: its routers start constant (zero weights), so every token gets the same score and the
depth ignores the token until the routers are trained.

This file is a helper for training scripts, not model code: checkpoints do not carry it, and it imports neither peft nor
anything beyond torch. It works on the model before `get_peft_model`, whether its class comes from this package or from
a checkpoint's remote code.
"""

from torch import nn


# Every linear projection of a Llama decoder layer (attention, then MLP).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# PEFT's own default for Llama models; PEFT has no default for model_type "mor", so pass target_modules explicitly.
DEFAULT_LORA_TARGET_MODULES = ("q_proj", "v_proj")
# Module types LoRA can wrap (PEFT also supports Conv layers, which MoR models do not have).
LORA_SUPPORTED_TYPES = (nn.Linear, nn.Embedding)


def router_linear_names(model: nn.Module) -> list[str]:
    """Full names (as in `model.named_modules()`) of the Linear layers inside the routers: the step routers, the
    auxiliary routers or the token-choice router. Empty for `routing="none"`. Use them in `target_modules` (LoRA on the
    routers) or in `modules_to_save` (train the routers fully)."""
    router_modules = model.routers() if hasattr(model, "routers") else []
    router_ids = {id(router) for router in router_modules}
    names = []
    for router_name, router in model.named_modules():
        if id(router) not in router_ids:
            continue
        for child_name, child in router.named_modules():
            if isinstance(child, nn.Linear):
                names.append(f"{router_name}.{child_name}")
    return names


def lora_target_modules(model: nn.Module, projections=DEFAULT_LORA_TARGET_MODULES, routers: bool = False) -> list[str]:
    """`target_modules` for a LoraConfig: the given projection names (every unique layer's), plus the router Linear
    layers when `routers` is True. Checked with `check_lora_target_modules`."""
    target_modules = list(projections)
    if routers:
        target_modules += router_linear_names(model)
    check_lora_target_modules(model, target_modules)
    return target_modules


def _matches(target: str, module_name: str) -> bool:
    """PEFT's rule for a list of target names: the full name, or a name that ends with "." + the target."""
    return module_name == target or module_name.endswith(f".{target}")


def describe_lora_targets(model: nn.Module) -> str:
    """The modules LoRA can target, one line per last name part, with the modules that hold them."""
    holders_by_name: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LORA_SUPPORTED_TYPES) and module_name:
            holder, _, last_part = module_name.rpartition(".")
            holders_by_name.setdefault(last_part, []).append(holder or "(top level)")
    width = max((len(name) for name in holders_by_name), default=0)
    return "\n".join(
        f"  {name.ljust(width)}  in {', '.join(holders)}" for name, holders in holders_by_name.items()
    )


def check_lora_target_modules(model: nn.Module, target_modules) -> None:
    """Raises a ValueError when a LoRA target matches no module LoRA can wrap, naming the targets and listing the
    modules that do exist.

    `target_modules` is a LoraConfig's list of names (PEFT's rule: a target matches a module whose full name equals it
    or ends with "." + it). A single string ("all-linear", which includes the router scorers, or a regular expression)
    is left to PEFT. Stricter than PEFT, which fails only when no target matches anything and then lists no module
    names: here every name in the list must match a module LoRA can wrap.
    """
    if isinstance(target_modules, str):
        # "all-linear" or a regular expression: PEFT matches those itself (this file imports only torch, see above).
        return
    if not target_modules:
        raise ValueError(f"target_modules is empty. Modules LoRA can target:\n{describe_lora_targets(model)}")
    module_types = {name: module for name, module in model.named_modules() if name}
    targets = {target: [name for name in module_types if _matches(target, name)] for target in target_modules}

    unmatched = [target for target, names in targets.items() if not names]
    unsupported = {
        target: sorted({type(module_types[name]).__name__ for name in names})
        for target, names in targets.items()
        if names and not any(isinstance(module_types[name], LORA_SUPPORTED_TYPES) for name in names)
    }
    if not unmatched and not unsupported:
        return
    problems = []
    if unmatched:
        problems.append(f"LoRA target_modules {unmatched} match no module of this {type(model).__name__}.")
    for target, type_names in unsupported.items():
        problems.append(
            f"LoRA target {target!r} matches only modules of type {', '.join(type_names)}, which LoRA cannot wrap; "
            f"name the Linear layers inside them."
        )
    raise ValueError(
        " ".join(problems)
        + " A target matches a module whose full name equals it or ends with '.' + it. Modules LoRA can target "
        + f"(last name part, then where it occurs):\n{describe_lora_targets(model)}"
    )


__all__ = [
    "LLAMA_PROJECTIONS",
    "DEFAULT_LORA_TARGET_MODULES",
    "router_linear_names",
    "lora_target_modules",
    "check_lora_target_modules",
    "describe_lora_targets",
]
