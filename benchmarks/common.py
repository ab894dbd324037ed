"""Shared pieces of the benchmark scripts: the models compared, the FLOP model and memory measurement."""

import importlib.util
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def seeded_prompts(num_requests: int, args) -> list[list[int]]:
    """The serving workload: prompt lengths in [args.min_prompt, args.max_prompt], then their tokens, drawn from one
    generator seeded with args.seed (tokens 1..args.vocab_size - 1)."""
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (num_requests,), generator=generator)
    return [torch.randint(1, args.vocab_size, (int(n),), generator=generator).tolist() for n in lengths]


def model_dims(args) -> dict:
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        num_hidden_layers=args.num_layers,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


def add_model_arguments(parser, hidden_size=512, num_layers=14):
    parser.add_argument("--hidden-size", type=int, default=hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=hidden_size * 11 // 4)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=num_layers, help="unrolled depth L of every model")
    parser.add_argument("--num-recursions", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)


def build_models(args, variants):
    """The compared models, all with the same width and unrolled depth. `variants` maps a name to MoR config
    overrides, or to None for the vanilla LlamaForCausalLM."""
    # Imported here: benchmarks/vllm_throughput.py reads this file's FLOP model in vLLM's environment, whose
    # transformers is older than the MoR model code needs.
    from modeling_mor import MoRConfig, MoRForCausalLM

    dtype = getattr(torch, args.dtype)
    models = {}
    for name, overrides in variants.items():
        torch.manual_seed(args.seed)
        if overrides is None:
            model = LlamaForCausalLM(LlamaConfig(**model_dims(args)))
        else:
            config = MoRConfig(**model_dims(args), num_recursions=args.num_recursions, **overrides)
            model = MoRForCausalLM(config)
        models[name] = model.to(device=args.device, dtype=dtype)
    return models


# The models the decoding and serving benchmarks compare.
DECODE_VARIANTS = {
    "vanilla Llama": None,
    "MoR routing=none": dict(routing="none"),
    "MoR expert, recursion-wise": dict(routing="expert_choice", kv_cache_policy="recursion_wise"),
    "MoR expert, shared KV": dict(routing="expert_choice", kv_cache_policy="shared"),
}


def build_decode_models(args):
    """`DECODE_VARIANTS` in eval mode, with router weights scaled by `args.router_scale`: an untrained router sits at
    the threshold, a scaled one makes mixed routing decisions."""
    models = build_models(args, DECODE_VARIANTS)
    with torch.no_grad():
        for model in models.values():
            model.eval()
            for router in getattr(model, "routers", lambda: [])():
                for parameter in router.parameters():
                    parameter.mul_(args.router_scale)
    return models


def layer_applications_per_token(config, recursion_depth: torch.Tensor) -> float:
    """Mean decoder-layer applications per real token: 2 + B * mean depth for middle_cycle, L for a vanilla model."""
    if getattr(config, "model_type", None) != "mor":
        return float(config.num_hidden_layers)
    real = recursion_depth[recursion_depth > 0].float()
    ends = 2 if config.has_unshared_ends else 0
    return ends + config.block_size * real.mean().item()


def matmul_flop_ratio(vanilla_config, mor_config, recursion_depth: torch.Tensor) -> float:
    """Ideal speed-up of MoR over a model that runs all L layers: the ratio of weight-matmul FLOPs per token
    (decoder layers plus the LM head; attention-score FLOPs, small at these lengths, are left out)."""
    hidden, intermediate = vanilla_config.hidden_size, vanilla_config.intermediate_size
    head_dim = hidden // vanilla_config.num_attention_heads
    attention = hidden * head_dim * (2 * vanilla_config.num_attention_heads + 2 * vanilla_config.num_key_value_heads)
    per_layer = attention + 3 * hidden * intermediate
    lm_head = hidden * vanilla_config.vocab_size
    full = vanilla_config.num_hidden_layers * per_layer + lm_head
    routed = layer_applications_per_token(mor_config, recursion_depth) * per_layer + lm_head
    return full / routed


def weight_pass_ratio(vanilla_config, mor_config, generated_depth: torch.Tensor) -> float:
    """Ideal decode speed-up over a model that runs all L layers when a layer costs the same whatever number of rows
    it runs on, i.e. when reading its weights dominates (batched decoding on most hardware). A synchronous decode
    step of the batch then pays for recursion step r whenever any row's token takes it: 2 unshared layers plus the
    block's layers times the step's deepest token. `generated_depth` is `[batch, decode steps]`; at batch 1 this
    equals `matmul_flop_ratio` over the same tokens."""
    deepest_per_step = generated_depth.max(dim=0, keepdim=True).values
    return matmul_flop_ratio(vanilla_config, mor_config, deepest_per_step)


def kept_bytes(root) -> int:
    """Bytes of every tensor storage reachable from `root` (through containers, attributes and slots), each storage
    counted once: what an object such as a cache keeps, measured without asking it."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), type, torch.dtype,
                                              torch.device, torch.nn.Module)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
            for name in getattr(type(obj), "__slots__", ()):
                stack.append(getattr(obj, name, None))
    return sum(storages.values())


def load_baseline_package(folder):
    """The `modeling_mor` package of another version of this repository (`folder` holds its `modeling_mor/`, e.g.
    `git archive COMMIT modeling_mor | tar -x -C FOLDER`), imported as `modeling_mor_baseline` next to the current
    one. Its `__init__` registers its classes with the Auto factories, which nothing here uses."""
    package = Path(folder) / "modeling_mor"
    spec = importlib.util.spec_from_file_location(
        "modeling_mor_baseline", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
