"""Convert a pretrained `LlamaForCausalLM` into an `MoRForCausalLM` (MOR_SPEC section 5).

Each shared layer of the recursion block is initialized from the pretrained layers that will be tied to it
("stepwise", "average", "lower", "upper" or "random"); the unshared first and last layers of the middle_* strategies,
the embeddings, the final norm and the LM head are copied as they are. Conversions use the "update" gating and
auxiliary routers by default, and the routers start neutral: a fresh conversion in eval mode routes every token to
full depth and computes exactly what the tied recursive Llama does; uptraining then teaches the routers.

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
    # quantization_config: a GGUF source is dequantized on load; the MoR weights are plain tensors.
    for field in ("architectures", "model_type", "transformers_version", "auto_map", "dtype", "torch_dtype",
                  "quantization_config"):
        config_fields.pop(field, None)
    config_fields.update(
        num_recursions=num_recursions,
        sharing_strategy=sharing_strategy,
        routing=routing,
        gating="update",
        # The auxiliary router learns the top-k decisions from the BCE loss alone, without competing with the LM
        # gradient that also reaches the gating router: a short uptraining is enough for eval-mode routing.
        router_inference="auxiliary",
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
    mor.start_routing_from_recursive_model_()
    return mor


# ----------------------------------------------------------------------------------------------------------------------
# Command line: python -m conversion.convert_llama_to_mor SOURCE OUTPUT_DIR ...
# ----------------------------------------------------------------------------------------------------------------------

CLI_EXAMPLE = """
Examples:

    # a local Llama/SmolLM folder (or a Hub id) -> an MoR folder, with perplexities measured on a text file
    python -m conversion.convert_llama_to_mor ../shared/data/stories260K outputs/stories-mor \\
        --num-recursions 3 --sharing-strategy middle_cycle --eval-file ../shared/data/tinystories/valid.txt

    # a GGUF file (dequantized by transformers), then pushed to the Hub as a private repo
    python -m conversion.convert_llama_to_mor path/to/SmolLM2-135M-Instruct.Q4_1.gguf outputs/smollm2-mor \\
        --num-recursions 2 --sharing-strategy middle_cycle --push-to-hub your-name/smollm2-mor --private
"""


def build_argument_parser():
    import argparse

    from modeling_mor.configuration_mor import GATINGS, KV_CACHE_POLICIES, ROUTER_INFERENCE, ROUTINGS, SHARING_STRATEGIES

    parser = argparse.ArgumentParser(
        prog="python -m conversion.convert_llama_to_mor",
        description="Convert a Llama-architecture checkpoint (Llama, SmolLM, SmolLM2) into a Mixture-of-Recursions model.",
        epilog=CLI_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="Hub id or local folder of the checkpoint, or a .gguf file")
    parser.add_argument("output_dir", help="folder to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--num-recursions", type=int, default=3)
    parser.add_argument("--sharing-strategy", default="middle_cycle", choices=SHARING_STRATEGIES)
    parser.add_argument("--init-strategy", default="stepwise", choices=INIT_STRATEGIES)
    parser.add_argument("--routing", default="expert_choice", choices=ROUTINGS)
    parser.add_argument("--kv-cache-policy", default="recursion_wise", choices=KV_CACHE_POLICIES)
    parser.add_argument("--router-inference", default="auxiliary", choices=ROUTER_INFERENCE,
                        help="expert-choice eval rule: 'auxiliary' (default for conversions) or 'threshold'")
    parser.add_argument("--gating", default="update", choices=GATINGS,
                        help="'update' (default) starts the converted model as the tied recursive model")
    parser.add_argument("--capacity", type=float, nargs="+", help="expert-choice capacity per step (default (N_r-r+1)/N_r)")
    parser.add_argument("--relaxation-rank", default="0",
                        help="rank of the per-step low-rank deltas (0 = none, 'full' = exact reproduction of the source)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    parser.add_argument("--gguf-file", help="name of the GGUF file inside SOURCE (a folder or Hub id)")
    parser.add_argument("--eval-file", help="text file on which to measure perplexity and recursion depths")
    parser.add_argument("--eval-max-tokens", type=int, default=16384)
    parser.add_argument("--eval-block-size", type=int, default=256)
    parser.add_argument("--base-model-name", help="name of the source shown in the model card (default: SOURCE)")
    parser.add_argument("--base-model-license", help="licence of the source (default: read from its model card)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in user's)")
    parser.add_argument("--commit-message", default="Upload MoR model converted with mor-transformers")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'random' init strategy and of the routers")
    return parser


def resolve_source(source: str, gguf_file: str | None = None):
    """(folder or Hub id, GGUF file name or None): a path to a .gguf file becomes its folder and file name."""
    from pathlib import Path

    path = Path(source)
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {source} does not exist.")
        return str(path.parent), path.name
    return source, gguf_file


def _source_license(source: str, explicit: str | None) -> str:
    from pathlib import Path

    if explicit:
        return explicit
    card = Path(source) / "README.md"
    if card.is_file():
        for line in card.read_text(encoding="utf-8").splitlines()[:40]:
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip()
    if not Path(source).exists():
        try:
            from huggingface_hub import model_info

            license_name = (model_info(source).card_data or {}).get("license")
            if license_name:
                return license_name
        except Exception:  # offline or no card: the card says so instead
            pass
    return "not stated by the source (check it before sharing this model)"


def _parse_relaxation_rank(value: str, hidden_size: int) -> int:
    if value == "full":
        return hidden_size
    if not value.isdigit():
        raise ValueError(f"--relaxation-rank={value!r} is not valid; give a rank >= 0 or 'full'.")
    return int(value)


def _convert_into(args, source, gguf_file, num_layers, relaxation_rank, output_dir, staging) -> dict:
    """Loads, converts, measures and saves into `staging`; returns the figures of the model card."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from .measure import full_depth, perplexity_and_depths, read_eval_tokens
    from .model_card import save_card

    print(f"Loading {args.source} ...")
    source_model = LlamaForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        if args.eval_file:
            raise ValueError(f"--eval-file needs the source's tokenizer, which could not be loaded: {error}") from error
        print(f"warning: no tokenizer could be loaded from {args.source} ({error}); the output folder has none.")
        tokenizer = None
    overrides = dict(
        kv_cache_policy=args.kv_cache_policy,
        gating=args.gating,
        relaxation_rank=relaxation_rank,
        router_inference=args.router_inference,
    )
    if args.capacity:
        overrides["capacity"] = args.capacity
    torch.manual_seed(args.seed)
    print(f"Converting to MoR: {args.sharing_strategy}, {args.num_recursions} recursions, {args.init_strategy} init ...")
    mor = convert_llama_to_mor(
        source_model,
        num_recursions=args.num_recursions,
        sharing_strategy=args.sharing_strategy,
        init_strategy=args.init_strategy,
        routing=args.routing,
        seed=args.seed,
        **overrides,
    ).eval()

    license_note = _source_license(source, args.base_model_license)
    license_id = license_note if " " not in license_note else "other"
    figures = {
        "model_name": output_dir.name,
        "base_model": args.base_model_name or args.source,
        "license": license_id,
        "license_note": license_note,
        "provenance_note": f"Converted with `python -m conversion.convert_llama_to_mor` from `{args.source}`"
        + (f" (GGUF file `{gguf_file}`, dequantized by transformers)" if gguf_file else "") + ".",
        "repo_id": args.push_to_hub or f"path/to/{output_dir.name}",
        "source_layers": num_layers,
        "num_hidden_layers": mor.config.num_hidden_layers,
        "unique_layers": mor.config.num_unique_layers,
        "block_size": mor.config.block_size,
        "num_recursions": mor.config.num_recursions,
        "source_parameters": f"{source_model.num_parameters():,}",
        "mor_parameters": f"{mor.num_parameters():,}",
        "sharing_strategy": mor.config.sharing_strategy,
        "init_strategy": args.init_strategy,
        "routing": mor.config.routing,
        "capacity": ", ".join(f"{c:.2f}" for c in mor.config.capacity),
        "gating": mor.config.gating,
        "kv_cache_policy": mor.config.kv_cache_policy,
        "relaxation": f"rank {relaxation_rank}" if relaxation_rank else "none",
    }
    if args.eval_file:
        token_ids = read_eval_tokens(tokenizer, args.eval_file, args.eval_max_tokens)
        source_ppl, _ = perplexity_and_depths(source_model, token_ids, args.eval_block_size, desc="source perplexity")
        with full_depth(mor):
            tied_ppl, _ = perplexity_and_depths(mor, token_ids, args.eval_block_size, desc="tied model perplexity")
        mor_ppl, depths = perplexity_and_depths(mor, token_ids, args.eval_block_size, desc="MoR perplexity")
        figures.update(
            eval_file=Path(args.eval_file).name,
            eval_tokens=token_ids.numel(),
            eval_block_size=args.eval_block_size,
            perplexity={
                f"source ({figures['base_model']})": source_ppl,
                "recursive (tied) model, every token at full depth": tied_ppl,
                "MoR as converted (untrained routers)": mor_ppl,
            },
            depth_histogram={str(depth): count for depth, count in sorted(depths.items()) if depth > 0},
            depth_model="freshly converted, untrained routers",
        )

    mor.to(getattr(torch, args.dtype)).save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    save_card(staging, figures)
    return figures


def main(argv=None) -> int:
    import sys
    import time
    from pathlib import Path

    from transformers import AutoConfig

    from .output_dir import OutputDirExistsError, check_output_dir, staged_output_dir

    args = build_argument_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        output_dir = Path(args.output_dir)
        check_output_dir(output_dir, args.overwrite)
        source, gguf_file = resolve_source(args.source, args.gguf_file)
        source_config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
        if source_config.model_type != "llama":
            raise ValueError(
                f"{args.source} is a {source_config.model_type!r} checkpoint "
                f"({', '.join(getattr(source_config, 'architectures', None) or ['unknown architecture'])}). Supported: "
                f"Llama-architecture checkpoints (model_type 'llama': Llama, SmolLM, SmolLM2), as a folder, Hub id or GGUF file."
            )
        num_layers = source_config.num_hidden_layers
        if args.num_recursions > 1 and (args.sharing_strategy, args.num_recursions) not in valid_recursion_layouts(num_layers):
            pairs = ", ".join(f"--sharing-strategy {s} --num-recursions {n}" for s, n in valid_recursion_layouts(num_layers))
            raise ValueError(
                f"The source has {num_layers} layers, which --sharing-strategy {args.sharing_strategy} with "
                f"--num-recursions {args.num_recursions} cannot unroll into. Valid choices for it: {pairs or 'none'}."
            )
        relaxation_rank = _parse_relaxation_rank(args.relaxation_rank, source_config.hidden_size)
    except (ValueError, OSError, OutputDirExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    # Everything is written to a staging folder that becomes OUTPUT_DIR only once complete (see output_dir.py).
    with staged_output_dir(output_dir, overwrite=args.overwrite) as staging:
        figures = _convert_into(args, source, gguf_file, num_layers, relaxation_rank, output_dir, staging)

    print(f"\nSaved {output_dir} in {time.perf_counter() - start:.0f}s")
    print(f"  source: {figures['base_model']} ({num_layers} layers, {figures['source_parameters']} parameters, licence: {figures['license_note']})")
    print(f"  MoR: {figures['sharing_strategy']}, {figures['num_recursions']} recursions, {figures['unique_layers']} unique layers "
          f"(block of {figures['block_size']}), {figures['mor_parameters']} parameters, routing {figures['routing']}")
    for label, value in figures.get("perplexity", {}).items():
        print(f"  perplexity {label}: {value:.2f}")
    if figures.get("depth_histogram"):
        print(f"  recursion depths (tokens): {figures['depth_histogram']}")

    if args.push_to_hub:
        from .push_to_hub import PushError, push_folder

        try:
            url = push_folder(output_dir, args.push_to_hub, private=args.private, token=args.token,
                              commit_message=args.commit_message)
        except PushError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"Pushed to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
