"""Convert a pretrained `LlamaForCausalLM` into an `MoRForCausalLM` (MOR_SPEC section 5).

Each shared layer of the recursion block is initialized from the pretrained layers that will be tied to it
("stepwise", "average", "lower", "upper", "random", or "search": chosen by perplexity on a calibration text); the
unshared first and last layers of the middle_* strategies, the embeddings, the final norm and the LM head are copied
as they are. Conversions use the "update" gating and
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

import argparse
import math
import random

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging

from modeling_mor import MoRConfig, MoRForCausalLM, valid_recursion_layouts
from modeling_mor.configuration_mor import recursion_block_size

from .cli_checks import (
    check_safetensors_files,
    hub_failure,
    looks_like_hub_id,
    fetching_from_hub,
    one_line,
    read_as_path,
)


logger = logging.get_logger(__name__)

INIT_STRATEGIES = ("stepwise", "average", "lower", "upper", "random", "search")
# "search" makes at most this many passes over the shared layers (each tries every other candidate of every shared
# layer once), and stops earlier when a pass changes nothing.
SEARCH_PASSES = 3
# How much calibration text "search" scores on by default (--calibration-max-tokens).
DEFAULT_CALIBRATION_TOKENS = 2048
# A router decides at each pass through the recursion block, which only the cycle strategies have (a sequence
# strategy applies each shared layer several times in a row instead). MoRConfig enforces it.
ROUTED_SHARING_STRATEGIES = ("cycle", "middle_cycle")


def default_num_recursions(num_layers: int, sharing_strategy: str) -> int | None:
    """`--num-recursions auto`: the smallest N_r >= 2 of `sharing_strategy` that an `num_layers`-layer source allows
    (the largest recursion block), or None when it allows none. The knee of the conversion recipe's table
    (docs/conversion.md#conversion-recipe): at the same hour of uptraining and the same compute, SmolLM2-135M kept
    more with N_r = 2 than with 4, 7 or 14 (fewer places a token can leave, each one for the last layer to learn)."""
    choices = [steps for strategy, steps in valid_recursion_layouts(num_layers) if strategy == sharing_strategy]
    return min(choices) if choices else None


def parse_num_recursions(value: str):
    """--num-recursions: a whole number, or "auto" (resolved once the source's layer count is known)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a whole number nor 'auto'") from None


def default_routing(sharing_strategy: str) -> str:
    """Expert-choice routing for the cycle strategies, "none" for the sequence ones (which cannot route)."""
    return "expert_choice" if sharing_strategy in ROUTED_SHARING_STRATEGIES else "none"


def _source_layer_indices(tied_groups: list[list[int]], init_strategy: str, seed: int) -> list[list[int]]:
    """For each shared layer, the pretrained layers its weights are initialized from (averaged when several); "search"
    is chosen by `_search_source_layers`."""
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


def check_search_init(config: MoRConfig) -> None:
    """Raises ValueError when the "search" init has nothing to choose for a conversion into `config`, or would score
    something other than the tied model at full depth."""
    if config.has_full_rank_relaxation:
        raise ValueError(
            f"--init-strategy search chooses the source layer each shared weight starts from, and a full-rank "
            f"relaxation (--relaxation-rank {config.relaxation_rank}) keeps every position's own source layer whatever "
            f"the choice. Fix: use it with --relaxation-rank 0 or a rank below {config.full_relaxation_rank}, or "
            f"leave the default init.")
    if config.routing == "token_choice":
        raise ValueError("--init-strategy search scores the tied model with every token at full depth, and a fresh "
                         "token-choice conversion sends every token out after the first step. Fix: use the default "
                         "expert-choice routing (or none) with it, or another init.")


def _search_source_layers(mor, shared_modules, tied_groups: list[list[int]], source_layers,
                          calibration_ids: torch.LongTensor) -> list[list[int]]:
    """The "search" init: each shared layer starts from one of the source layers at the positions it serves, chosen
    by coordinate descent on the perplexity of `calibration_ids` at full depth. It starts from the best uniform choice
    (every shared layer the source layer at its k-th position, for each k), then tries each other candidate of each
    shared layer in turn, keeping a change whenever the perplexity falls, for up to SEARCH_PASSES passes or until a
    pass changes nothing. Per-step deltas are still zero here, so the search scores the tied layers alone.

    Why: which layers a model can share is not uniform. In SmolLM2-135M the previous layer's weights in place of
    layer 1 or 11 multiply the perplexity by about 70 or 13, in place of most others by 1.2-1.7, so a fixed rule ties
    some critical layer wrongly (docs/conversion.md#which-layers-can-be-shared)."""
    from tqdm.auto import tqdm

    from .measure import full_depth, perplexity_and_depths

    def load_and_score(choice) -> float:
        for module, group, position in zip(shared_modules, tied_groups, choice):
            module.load_state_dict(source_layers[group[position]].state_dict(), strict=False)
        with full_depth(mor):
            perplexity = perplexity_and_depths(mor, calibration_ids, desc="init search")[0]
        return perplexity if math.isfinite(perplexity) else math.inf  # a NaN would win no comparison and stick

    num_candidates = len(tied_groups[0])
    scored = {}
    with tqdm(desc="init search (perplexity at full depth)", unit="trial") as progress:
        def score(choice) -> float:
            if choice not in scored:
                scored[choice] = load_and_score(choice)
                progress.update()
                progress.set_postfix(best=f"{min(scored.values()):.4g}")
            return scored[choice]

        best = min((tuple([position] * len(tied_groups)) for position in range(num_candidates)), key=score)
        uniform = score(best)
        for _ in range(SEARCH_PASSES):
            start = best
            for layer in range(len(tied_groups)):
                for position in range(num_candidates):
                    trial = best[:layer] + (position,) + best[layer + 1:]
                    if score(trial) < score(best):
                        best = trial
            if best == start:
                break
    logger.info(f"init search: {len(scored)} trials; perplexity at full depth on {calibration_ids.numel()} "
                f"calibration tokens {score(best):.4g} (the best uniform choice: {uniform:.4g})")
    return [[group[position]] for group, position in zip(tied_groups, best)]


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


def mor_config_for(
    source_config, *, num_recursions: int, sharing_strategy: str, routing: str | None = None, **config_overrides
) -> MoRConfig:
    """The `MoRConfig` a conversion of a model with `source_config` builds (raises ValueError when it is not valid).

    Cheap (no weights), so the command line builds it before loading anything to check every option at once.
    """
    config_fields = source_config.to_dict()
    # quantization_config: a GGUF source is dequantized on load; the MoR weights are plain tensors.
    for field in ("architectures", "model_type", "transformers_version", "auto_map", "dtype", "torch_dtype",
                  "quantization_config"):
        config_fields.pop(field, None)
    config_fields.update(
        num_recursions=num_recursions,
        sharing_strategy=sharing_strategy,
        routing=routing or default_routing(sharing_strategy),
        gating="update",
        # The auxiliary router learns the top-k decisions from the BCE loss alone, without competing with the LM
        # gradient that also reaches the gating router: a short uptraining is enough for eval-mode routing.
        router_inference="auxiliary",
        architectures=["MoRForCausalLM"],
    )
    config_fields.update(config_overrides)
    return MoRConfig(**config_fields)


@torch.no_grad()
def convert_llama_to_mor(
    model: LlamaForCausalLM,
    *,
    num_recursions: int,
    sharing_strategy: str,
    init_strategy: str = "stepwise",
    routing: str | None = None,
    seed: int = 0,
    calibration_ids: torch.LongTensor | None = None,
    **config_overrides,
) -> MoRForCausalLM:
    """Returns a new `MoRForCausalLM` initialized from `model` (which is left untouched).

    `init_strategy="search"` chooses each shared layer's source layer by perplexity on `calibration_ids` (a 1-D
    tensor of token ids: training text, never the text you report), see `_search_source_layers`. The returned model's
    `init_source_layers` lists, for each shared layer, the source layers it was initialized from.

    `routing` defaults to "expert_choice" for the cycle strategies and "none" for the sequence ones, which cannot
    route. `config_overrides` set any other `MoRConfig` field (for example `kv_cache_policy`, `capacity`, `gating`,
    `relaxation_rank`: with it, the per-step deltas start from the SVD of the tied layers' differences).
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(
            f"convert_llama_to_mor takes a LlamaForCausalLM (Llama, SmolLM and SmolLM2 checkpoints load as one), "
            f"got {type(model).__name__}."
        )
    if init_strategy not in INIT_STRATEGIES:
        raise ValueError(f"init_strategy={init_strategy!r} is not valid; choose one of {', '.join(INIT_STRATEGIES)}.")
    if init_strategy == "search" and calibration_ids is None:
        raise ValueError("init_strategy='search' scores its choices on calibration_ids. Fix: pass the token ids of "
                         "some training text as calibration_ids.")
    if init_strategy != "search" and calibration_ids is not None:
        raise ValueError(f"calibration_ids are read only by init_strategy='search' (given: {init_strategy!r}). Fix: "
                         f"pass init_strategy='search', or leave calibration_ids out.")
    source_config = model.config
    num_layers = source_config.num_hidden_layers
    layouts = valid_recursion_layouts(num_layers)
    if num_recursions > 1 and (sharing_strategy, num_recursions) not in layouts:
        raise ValueError(
            f"A {num_layers}-layer model cannot be converted with sharing_strategy={sharing_strategy!r} and "
            f"num_recursions={num_recursions}. Valid (sharing_strategy, num_recursions) pairs for it: "
            f"{', '.join(f'({s!r}, {n})' for s, n in layouts) or 'none'}."
        )

    config = mor_config_for(
        source_config, num_recursions=num_recursions, sharing_strategy=sharing_strategy, routing=routing,
        **config_overrides,
    )
    if init_strategy == "search":
        check_search_init(config)
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
    for key in ends:
        sources_for_end = tied_groups[key]
        modules[key].load_state_dict(source_layers[sources_for_end[0]].state_dict())
    mor.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    mor.model.norm.load_state_dict(model.model.norm.state_dict())
    mor.lm_head.load_state_dict(model.lm_head.state_dict())
    # Neutral gates before the search, which scores the tied model as the conversion will start.
    mor.start_routing_from_recursive_model_()
    if init_strategy == "search":
        sources = _search_source_layers(mor, [modules[key] for key in shared_keys],
                                        [tied_groups[key] for key in shared_keys], source_layers, calibration_ids)
    else:
        sources = _source_layer_indices([tied_groups[key] for key in shared_keys], init_strategy, seed)
    for key, source_indices in zip(shared_keys, sources):
        states = [source_layers[index].state_dict() for index in source_indices]
        averaged = {name: torch.stack([state[name] for state in states]).mean(0) for name in states[0]}
        # strict=False: a relaxed layer also has its per-step deltas, initialized below.
        modules[key].load_state_dict(averaged, strict=False)

    if config.relaxation_rank > 0:
        _init_relaxation(mor, source_layers)
    mor.init_source_layers = sources
    return mor


# ----------------------------------------------------------------------------------------------------------------------
# Command line: mor-convert SOURCE OUTPUT_DIR ... (or python -m conversion.convert_llama_to_mor from the repository)
# ----------------------------------------------------------------------------------------------------------------------

CLI_EXAMPLE = """
Examples:

    # a local Llama/SmolLM folder (or a Hub id) -> an MoR folder, with perplexities measured on a text file
    mor-convert examples/assets/stories260K outputs/stories-mor \\
        --num-recursions 3 --sharing-strategy middle_cycle --eval-file examples/assets/tinystories_valid_sample.txt

    # a GGUF file (dequantized by transformers; needs pip install "mor-transformers[gguf]"), then pushed to the Hub
    mor-convert path/to/SmolLM2-135M-Instruct.Q4_1.gguf outputs/smollm2-mor \\
        --num-recursions 2 --sharing-strategy middle_cycle --push-to-hub your-name/smollm2-mor --private

Every option is checked before the source is loaded; bad input stops with one "error:" line (exit code 2) and
nothing written. OUTPUT_DIR may not be SOURCE, lie inside it or contain it, even with --overwrite; --overwrite
replaces an earlier output of these tools only (never a folder holding anything else, nor the working directory).
"""

# GGUF metadata keys that name the Hub repo a GGUF file was converted from (gguf-py's `Keys.General`; the first one
# is what older llama.cpp converters wrote). `general.base_model.N.*` is not used: it names the model the source was
# itself fine-tuned from, not the source.
GGUF_SOURCE_REPO_KEYS = ("general.source.huggingface.repository", "general.source.repo_url", "general.repo_url")


def build_argument_parser():
    from modeling_mor.configuration_mor import (
        GATINGS,
        KV_CACHE_POLICIES,
        ROUTER_INFERENCE,
        ROUTER_TYPES,
        ROUTINGS,
        SHARING_STRATEGIES,
    )

    from .cli_checks import HelpFormatter
    from .measure import DEFAULT_BLOCK_SIZE

    parser = argparse.ArgumentParser(
        prog="mor-convert",
        description="Convert a Llama-architecture checkpoint (Llama, SmolLM, SmolLM2) into a Mixture-of-Recursions model.",
        epilog=CLI_EXAMPLE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", help="local checkpoint folder, .gguf file, or Hub id ('name' or 'org/name')")
    parser.add_argument("output_dir", help="folder to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--num-recursions", type=parse_num_recursions, default="auto",
                        help="N_r, how many times the shared block is applied (>= 1), or 'auto' (the default): the "
                             "smallest N_r >= 2 the source's layer count allows (SmolLM2-135M: 2; stories260K: 3)")
    parser.add_argument("--sharing-strategy", default="middle_cycle", choices=SHARING_STRATEGIES,
                        help="which layers share weights: 'cycle' repeats the block of shared layers N_r times, "
                             "'sequence' repeats each shared layer N_r times in a row; 'middle_' keeps the first and "
                             "last layers unshared")
    parser.add_argument("--init-strategy", default="stepwise", choices=INIT_STRATEGIES,
                        help="which pretrained layers initialize each shared layer: every N_r-th one ('stepwise'), "
                             "the average of the layers tied to it, the lowest or highest ones, random ones, or "
                             "'search': for each shared layer the one of its positions' layers that gives the tied "
                             "model the lowest perplexity on --calibration-file (for --relaxation-rank 0 or a low "
                             "rank; about a minute for SmolLM2-135M)")
    parser.add_argument("--calibration-file",
                        help="UTF-8 text that --init-strategy search scores its choices on: text like the training "
                             "text, not the text you report (--eval-file)")
    parser.add_argument("--calibration-max-tokens", type=int,
                        help=f"the search scores the first N tokens of --calibration-file (default: "
                             f"{DEFAULT_CALIBRATION_TOKENS})")
    parser.add_argument("--routing", choices=ROUTINGS,
                        help="default: expert_choice for the cycle strategies, none for sequence and middle_sequence "
                             "(which cannot route)")
    parser.add_argument("--kv-cache-policy", default="recursion_wise", choices=KV_CACHE_POLICIES,
                        help="'recursion_wise': each recursion step caches the keys and values of the tokens it "
                             "processes; 'shared': every step reuses the first step's")
    parser.add_argument("--router-inference", default="auxiliary", choices=ROUTER_INFERENCE,
                        help="expert-choice eval rule: 'auxiliary' (default for conversions) or 'threshold'")
    parser.add_argument("--router-type", default="linear", choices=ROUTER_TYPES,
                        help="every router's scorer: 'linear' (default) or 'mlp' (two layers, hidden size / 2 wide)")
    parser.add_argument("--gating", default="update", choices=GATINGS,
                        help="'update' (default) starts the converted model as the tied recursive model")
    parser.add_argument("--capacity", type=float, nargs="+",
                        help="expert-choice capacity per step: N_r non-increasing fractions in (0, 1] "
                             "(default (N_r-r+1)/N_r)")
    parser.add_argument("--relaxation-rank", default="full",
                        help="rank of the per-step deltas: 'full' (the default) keeps every source layer exact, so the "
                             "conversion is the source at full depth and routing saves compute; 0 ties the layers "
                             "for real (fewer parameters, which uptraining must relearn); N in between")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    parser.add_argument("--gguf-file", help="name of the GGUF file inside SOURCE (a folder or Hub id)")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="write the folder without a tokenizer when SOURCE has none (uptraining, evaluation and "
                             "generation need one: save it next to the weights later); a source without one is "
                             "refused otherwise")
    parser.add_argument("--eval-file", help="UTF-8 text file on which to measure perplexity and recursion depths")
    parser.add_argument("--eval-max-tokens", type=int, default=16384,
                        help="measure on the first N tokens of --eval-file")
    parser.add_argument("--eval-block-size", type=int,
                        help=f"tokens per perplexity block (default: {DEFAULT_BLOCK_SIZE}, capped at the source's "
                             f"context, max_position_embeddings; a larger explicit value is refused)")
    parser.add_argument("--base-model-name",
                        help="Hub id of the source for the model card's base_model (default: SOURCE when it is a Hub "
                             "id, else the repo a GGUF's metadata names; a local source without one leaves it out)")
    parser.add_argument("--base-model-license", help="licence of the source (default: read from its model card)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in user's)")
    parser.add_argument("--commit-message", default="Upload MoR model converted with mor-transformers",
                        help="commit message of the Hub upload")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUTPUT_DIR if it is an earlier output of these tools (a folder holding anything "
                             "else is refused)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the 'random' init strategy and of the routers")
    return parser


def resolve_source(source: str, gguf_file: str | None = None):
    """(folder or Hub id, GGUF file name or None): a path to a .gguf file becomes its folder and file name."""
    from pathlib import Path

    path = Path(source)
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(
                f"the GGUF file {source} does not exist ({path.expanduser().absolute()}); nothing was written. "
                f"Check the path, or give a checkpoint folder or a Hub id instead."
            )
        return str(path.parent), path.name
    return source, gguf_file


def check_source(source: str, gguf_file: str | None = None) -> bool:
    """Raises FileNotFoundError (one line, naming the fix) when `source` (as `resolve_source` returns it) is neither
    an existing local checkpoint nor a Hub id; returns whether it is a Hub id (to be fetched from the Hub)."""
    from pathlib import Path

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(
                f"{source} is a file, not a checkpoint folder; nothing was written. Give the folder that holds "
                f"config.json and the weights, or a .gguf file."
            )
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"--gguf-file {gguf_file} is not in {source}; nothing was written. GGUF files "
                                    f"there: {', '.join(sorted(p.name for p in path.glob('*.gguf'))) or 'none'}.")
        if gguf_file is None and not (path / "config.json").is_file():
            gguf_files = sorted(p.name for p in path.glob("*.gguf"))
            hint = (f"it holds GGUF file(s) {', '.join(gguf_files)}: pass --gguf-file {gguf_files[0]}, or the .gguf "
                    f"file's path as SOURCE" if gguf_files else "give the folder of a saved Llama checkpoint")
            raise FileNotFoundError(f"{source} has no config.json, so it is not a checkpoint folder; nothing was "
                                    f"written. Fix: {hint}.")
        return False
    if looks_like_hub_id(source):
        return True
    spelled = f" ({path.absolute()})" if str(path.absolute()) != source else ""
    raise FileNotFoundError(
        f"the source folder {source} does not exist{spelled}{read_as_path(source)}; nothing was written. Check the path, or give a .gguf "
        f"file or a Hub id ('name' or 'org/name')."
    )


def read_source_config(source: str, gguf_file: str | None = None, name: str | None = None):
    """(config, GGUF metadata or None) of a checkpoint that `check_source` accepted (a folder, or a Hub id: `source`
    not found here), read without loading any weights: the safetensors files of a local folder must be readable, a
    GGUF file needs the `gguf` package, and a Hub failure is one line (naming the argument `name` that gave it)."""
    import contextlib
    from pathlib import Path

    from transformers import AutoConfig

    is_hub_id = not Path(source).expanduser().exists()
    local_source = None if is_hub_id else str(Path(source).expanduser() / (gguf_file or ""))
    gguf_metadata = None
    if gguf_file is not None:
        check_gguf_support(local_source or f"{gguf_file} of {source}")
        if local_source is not None:
            gguf_metadata = read_gguf_metadata(local_source)
    elif local_source is not None:
        check_safetensors_files(local_source)
    try:
        with fetching_from_hub(source, name or "SOURCE") if is_hub_id else contextlib.nullcontext():
            config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        if is_hub_id:
            raise OSError(hub_failure(source, error, name)) from error
        raise
    return config, gguf_metadata


def check_gguf_support(gguf_file: str) -> None:
    """Raises ImportError (one line, naming the extra to install) when the `gguf` package transformers reads GGUF
    files with is missing or too old."""
    from transformers.utils import is_gguf_available
    from transformers.utils.import_utils import GGUF_MIN_VERSION

    fix = 'pip install "mor-transformers[gguf]" (or pip install gguf)'
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"converting the GGUF file {gguf_file} needs the `gguf` package, which is not installed; nothing was "
            f"written. Fix: {fix}."
        ) from error
    if not is_gguf_available(GGUF_MIN_VERSION):
        raise ImportError(f"converting the GGUF file {gguf_file} needs gguf>={GGUF_MIN_VERSION}, and an older one is "
                          f"installed; nothing was written. Fix: {fix.replace('install', 'install -U')}.")


def read_gguf_metadata(path) -> dict:
    """The metadata of a local GGUF file (no tensor data is read); ValueError when it is not a GGUF file."""
    from transformers.integrations.gguf import read_gguf_metadata as read_metadata

    try:
        metadata, _ = read_metadata(str(path))
    except (ValueError, OSError, IndexError) as error:  # IndexError/struct errors: a truncated header
        raise ValueError(f"{path} is not a readable GGUF file ({one_line(error)}); nothing was written. Download "
                         f"or copy it again.") from error
    return metadata


def hub_repo_id(value) -> str | None:
    """'org/name' from a Hub repo id or a Hub model URL; None for anything else (another host, a dataset, a Space)."""
    from urllib.parse import urlsplit

    from huggingface_hub.constants import HF_URL_HOSTS

    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if "://" in value:
        url = urlsplit(value)
        parts = [part for part in url.path.split("/") if part]
        if (url.hostname or "").lower() not in HF_URL_HOSTS or len(parts) < 2 or parts[0] in ("datasets", "spaces"):
            return None
        value = "/".join(parts[:2])
    return value if "/" in value and looks_like_hub_id(value, given_as_path=False) else None


def gguf_base_model_name(metadata: dict) -> str | None:
    """The Hub id of the model a GGUF file was converted from, when its metadata names one."""
    for key in GGUF_SOURCE_REPO_KEYS:
        repo_id = hub_repo_id(metadata.get(key))
        if repo_id:
            return repo_id
    return None


def source_license(source: str, explicit: str | None = None, gguf_metadata: dict | None = None) -> dict:
    """The model card's `license` (an identifier, or "other") and `license_note` (what to tell the reader) of a model
    converted from `source`: `explicit` (--base-model-license), else what the GGUF metadata or the source's own model
    card (README.md, locally or on the Hub) says."""
    note = _license_note(source, explicit, gguf_metadata)
    return {"license": note if " " not in note else "other", "license_note": note}


def _license_note(source: str, explicit: str | None, gguf_metadata: dict | None) -> str:
    from pathlib import Path

    if explicit:
        return explicit
    if gguf_metadata and isinstance(gguf_metadata.get("general.license"), str):
        return gguf_metadata["general.license"]
    card = Path(source) / "README.md"
    if card.is_file():
        for line in card.read_text(encoding="utf-8").splitlines()[:40]:
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip()
    if not Path(source).exists() and looks_like_hub_id(source):
        try:
            from huggingface_hub import model_info

            license_name = (model_info(source).card_data or {}).get("license")
            if license_name:
                return license_name
        except Exception:  # offline or no card: the card says so instead
            pass
    return "not stated by the source (check it before sharing this model)"


def parse_relaxation_rank(value: str, hidden_size: int) -> int:
    """--relaxation-rank as a number: "full" is the hidden size (every delta of full rank, stored whole)."""
    if value == "full":
        return hidden_size
    if not value.isdigit():
        raise ValueError(f"--relaxation-rank={value!r} is not valid; give a rank >= 0 or 'full'.")
    return int(value)


def _layout_choices(num_layers: int) -> str:
    """The (strategy, N_r) pairs an `num_layers`-layer source can be converted with, as command-line options."""
    return ", ".join(f"--sharing-strategy {s} --num-recursions {n}" for s, n in valid_recursion_layouts(num_layers))


def _check_recursion_options(args, num_layers: int | None = None) -> None:
    """--num-recursions, --capacity and --routing, in the command line's terms (MoRConfig checks them again)."""
    layouts = valid_recursion_layouts(num_layers) if num_layers is not None else None
    choices = _layout_choices(num_layers) if num_layers is not None else ""
    if args.num_recursions == "auto":
        return  # checked once `_check_arguments` has resolved it from the source's layer count
    if args.num_recursions < 1:
        valid = f"; valid choices for this {num_layers}-layer source: {choices or 'none'}" if layouts is not None else ""
        raise ValueError(
            f"--num-recursions {args.num_recursions} is not valid: it is how many times the shared block is applied, "
            f"so it must be at least 1 (2 or more to share layers). Fix: pass e.g. --num-recursions 3{valid}."
        )
    if layouts is not None and args.num_recursions > 1 and (args.sharing_strategy, args.num_recursions) not in layouts:
        raise ValueError(
            f"The source has {num_layers} layers, which --sharing-strategy {args.sharing_strategy} with "
            f"--num-recursions {args.num_recursions} cannot unroll into. Valid choices for it: {choices or 'none'}."
        )
    routing = args.routing or default_routing(args.sharing_strategy)
    if routing != "none" and args.sharing_strategy not in ROUTED_SHARING_STRATEGIES:
        cycle = args.sharing_strategy.replace("sequence", "cycle")
        raise ValueError(
            f"--routing {routing} needs --sharing-strategy cycle or middle_cycle (a router decides at each pass "
            f"through the shared block, which --sharing-strategy {args.sharing_strategy} does not have). Fix: pass "
            f"--routing none, or --sharing-strategy {cycle}."
        )
    if args.capacity is not None:
        given = " ".join(f"{fraction:g}" for fraction in args.capacity)
        steps = args.num_recursions
        default = " ".join(f"{(steps - step) / steps:.2f}" for step in range(steps))
        if len(args.capacity) != args.num_recursions:
            problem = (f"gives {len(args.capacity)} fraction(s), and --num-recursions {args.num_recursions} needs one "
                       f"per recursion step")
        elif any(not 0.0 < fraction <= 1.0 for fraction in args.capacity):
            problem = "has a fraction outside (0, 1] (the share of the tokens that a recursion step keeps)"
        elif any(later > earlier for earlier, later in zip(args.capacity, args.capacity[1:])):
            problem = "increases, and a token dropped at one recursion step never returns"
        else:
            return
        raise ValueError(f"--capacity {given} is not valid: it {problem}. Fix: pass {args.num_recursions} "
                         f"non-increasing fractions in (0, 1], e.g. --capacity {default} (the default).")


def _check_calibration_options(args) -> None:
    """--init-strategy search and the calibration text it reads (the rest of its checks need the config)."""
    from pathlib import Path

    from .measure import read_eval_text

    if args.init_strategy == "search" and args.calibration_file is None:
        raise ValueError("--init-strategy search scores its choices on --calibration-file. Fix: add --calibration-file "
                         "with some of your training text.")
    if args.calibration_file is None:
        if args.calibration_max_tokens is not None:
            raise ValueError(f"--calibration-max-tokens {args.calibration_max_tokens} needs --calibration-file, which "
                             f"it would limit. Fix: add --init-strategy search --calibration-file TEXT, or leave it "
                             f"out.")
        return
    if args.init_strategy != "search":
        raise ValueError(f"--calibration-file is read only by --init-strategy search (given: --init-strategy "
                         f"{args.init_strategy}). Fix: add --init-strategy search, or leave --calibration-file out.")
    if args.no_tokenizer:
        raise ValueError("--init-strategy search needs the source's tokenizer to read --calibration-file, which "
                         "--no-tokenizer leaves out. Fix: leave out one of them.")
    if args.calibration_max_tokens is None:
        args.calibration_max_tokens = DEFAULT_CALIBRATION_TOKENS
    if args.calibration_max_tokens < 2:
        raise ValueError(f"--calibration-max-tokens {args.calibration_max_tokens} is not valid: perplexity needs at "
                         f"least 2 tokens. Pass a larger value (default {DEFAULT_CALIBRATION_TOKENS}).")
    if args.eval_file and Path(args.eval_file).resolve() == Path(args.calibration_file).resolve():
        raise ValueError(f"--calibration-file and --eval-file are the same file ({args.eval_file}): the init would be "
                         f"chosen on the text it is then measured on. Fix: calibrate on training text and measure on "
                         f"held-out text.")
    read_eval_text(args.calibration_file, "--calibration-file")


def _check_arguments(args, output_dir) -> dict:
    """Every check that needs no weights: paths, the source's config, the options, the output folder. Raises
    ValueError, OSError or ImportError (one line each); returns what loading and converting need."""
    from pathlib import Path

    from .cli_checks import check_option_needs
    from .measure import context_length, eval_block_size, read_eval_text
    from .output_dir import check_output_dir, check_output_dir_is_separate

    _check_recursion_options(args)
    check_option_needs("--eval-file", args.eval_file, {"--eval-block-size": args.eval_block_size})
    if args.no_tokenizer and args.eval_file:
        raise ValueError("--eval-file needs the source's tokenizer, which --no-tokenizer leaves out. Fix: leave out "
                         "one of them.")
    if args.push_to_hub:
        from .push_to_hub import check_repo_id

        check_repo_id(args.push_to_hub)  # before converting: a repo id the Hub would refuse wastes the work
    _check_calibration_options(args)
    if args.eval_file is not None:
        if args.eval_max_tokens < 2:
            raise ValueError(f"--eval-max-tokens {args.eval_max_tokens} is not valid: perplexity needs at least 2 "
                             f"tokens. Pass a larger value (default 16384).")
        read_eval_text(args.eval_file)

    source, gguf_file = resolve_source(args.source, args.gguf_file)
    is_hub_id = check_source(source, gguf_file)
    if not is_hub_id:
        source = str(Path(source).expanduser())  # transformers would take a quoted "~/model" for a Hub id
    local_source = None if is_hub_id else (str(Path(source) / gguf_file) if gguf_file else source)
    # What the run reads: OUTPUT_DIR may not be, contain or lie inside any of them, even with --overwrite.
    inputs = {"SOURCE": local_source, "--eval-file": args.eval_file, "--calibration-file": args.calibration_file}
    check_output_dir_is_separate(output_dir, **inputs)
    check_output_dir(output_dir, args.overwrite)

    source_config, gguf_metadata = read_source_config(source, gguf_file)
    if source_config.model_type != "llama":
        raise ValueError(
            f"{args.source} is a {source_config.model_type!r} checkpoint "
            f"({', '.join(getattr(source_config, 'architectures', None) or ['unknown architecture'])}). Supported: "
            f"Llama-architecture checkpoints (model_type 'llama': Llama, SmolLM, SmolLM2), as a folder, Hub id or GGUF file."
        )
    num_layers = source_config.num_hidden_layers
    auto_num_recursions = args.num_recursions == "auto"
    if auto_num_recursions:
        args.num_recursions = default_num_recursions(num_layers, args.sharing_strategy)
        if args.num_recursions is None:
            raise ValueError(f"--num-recursions auto: the source's {num_layers} layers have no --sharing-strategy "
                             f"{args.sharing_strategy} layout. Valid choices for it: {_layout_choices(num_layers) or 'none'}.")
    _check_recursion_options(args, num_layers)
    relaxation_rank = parse_relaxation_rank(args.relaxation_rank, source_config.hidden_size)
    block_size = eval_block_size(args.eval_block_size, context_length(source_config)) if args.eval_file else None
    routing = args.routing or default_routing(args.sharing_strategy)
    overrides = dict(
        kv_cache_policy=args.kv_cache_policy,
        gating=args.gating,
        relaxation_rank=relaxation_rank,
        router_inference=args.router_inference,
        router_type=args.router_type,
    )
    if args.capacity:
        overrides["capacity"] = args.capacity
    # The very config the conversion will build: whatever the checks above missed fails here, before loading.
    mor_config = mor_config_for(source_config, num_recursions=args.num_recursions,
                                sharing_strategy=args.sharing_strategy, routing=routing, **overrides)
    if args.init_strategy == "search":
        check_search_init(mor_config)

    if args.base_model_name:
        base_model = args.base_model_name
    elif is_hub_id:
        base_model = source
    else:
        base_model = gguf_base_model_name(gguf_metadata) if gguf_metadata else None
    return dict(
        source=source, gguf_file=gguf_file, inputs=inputs, num_layers=num_layers, routing=routing, overrides=overrides,
        relaxation_rank=relaxation_rank, block_size=block_size, base_model=base_model, gguf_metadata=gguf_metadata,
        source_config=source_config, auto_num_recursions=auto_num_recursions,
    )


def _load_source(args, plan) -> tuple:
    """(source model, tokenizer or None, evaluation token ids or None, calibration token ids or None); bad weights or
    text raise ValueError.

    The tokenizer and the texts come first: they are cheap, and an unusable text is refused before the
    weights are loaded."""
    from safetensors import SafetensorError

    from .cli_checks import load_tokenizer
    from .measure import check_fills_one_block, context_length, eval_block_size, read_eval_tokens

    source, gguf_file = plan["source"], plan["gguf_file"]
    tokenizer = None
    if not args.no_tokenizer:
        tokenizer = load_tokenizer(
            source, "SOURCE", "the MoR folder needs it to be uptrained, evaluated or to generate text",
            fix="save the source model's tokenizer next to its weights, or pass --no-tokenizer to write the folder "
                "without one (and add it later)", gguf_file=gguf_file, trust_remote_code=False)
    token_ids = None
    if args.eval_file:
        token_ids = read_eval_tokens(tokenizer, args.eval_file, args.eval_max_tokens)
        check_fills_one_block(token_ids, plan["block_size"], args.eval_file, args.eval_max_tokens)
    calibration_ids = None
    if args.calibration_file:
        calibration_ids = read_eval_tokens(tokenizer, args.calibration_file, args.calibration_max_tokens,
                                           "--calibration-file")
        # The search's perplexity: blocks of the default size, at least one full one (as for --eval-file).
        check_fills_one_block(calibration_ids, eval_block_size(None, context_length(plan["source_config"])),
                              args.calibration_file, args.calibration_max_tokens, "--calibration-file",
                              "--calibration-max-tokens")
    print(f"Loading {args.source} ...")
    try:
        source_model = LlamaForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32).eval()
    except (OSError, SafetensorError) as error:
        raise ValueError(f"the weights of {args.source} could not be loaded ({one_line(error)}); nothing was "
                         f"written. Fix: download or copy the checkpoint again.") from error
    return source_model, tokenizer, token_ids, calibration_ids


def _convert_into(args, plan, source_model, tokenizer, token_ids, calibration_ids, output_dir, staging) -> dict:
    """Converts, measures and saves into `staging`; returns the figures of the model card."""
    from pathlib import Path

    from .measure import depth_histogram, full_depth, perplexity_and_depths
    from .model_card import save_card

    torch.manual_seed(args.seed)
    print(f"Converting to MoR: {args.sharing_strategy}, {args.num_recursions} recursions, {args.init_strategy} init ...")
    mor = convert_llama_to_mor(
        source_model,
        num_recursions=args.num_recursions,
        sharing_strategy=args.sharing_strategy,
        init_strategy=args.init_strategy,
        routing=plan["routing"],
        seed=args.seed,
        calibration_ids=calibration_ids,
        **plan["overrides"],
    ).eval()
    init_note = ""
    if args.init_strategy == "search":
        chosen = ", ".join(str(indices[0]) for indices in mor.init_source_layers)
        init_note = (f"; the shared layers start from source layers {chosen} (chosen by perplexity on "
                     f"{calibration_ids.numel():,} tokens of `{Path(args.calibration_file).name}`)")
        print(f"Init search: the shared layers start from source layers {chosen}")

    # base_model: a Hub id or None (a local source that names none: the card leaves the field out and says why).
    base_model = plan["base_model"]
    source_name = base_model or Path(args.source).name
    gguf_file = plan["gguf_file"]
    relaxation_rank = plan["relaxation_rank"]
    relaxation = f"rank {relaxation_rank}" if relaxation_rank else "none"
    if mor.config.has_full_rank_relaxation:
        relaxation += (" (full: every projection runs a weight of its own at each step, the source layer's at that "
                       "position)")
    figures = {
        "model_name": output_dir.name,
        "base_model": base_model,
        "source_name": source_name,
        **source_license(plan["source"], args.base_model_license, plan["gguf_metadata"]),
        "provenance_note": f"Converted with `mor-convert` from `{args.source}`"
        + (f" (GGUF file `{gguf_file}`, dequantized by transformers)" if gguf_file else "") + ".",
        "repo_id": args.push_to_hub or f"path/to/{output_dir.name}",
        "source_layers": plan["num_layers"],
        "num_hidden_layers": mor.config.num_hidden_layers,
        "unique_layers": mor.config.num_unique_layers,
        "block_size": mor.config.block_size,
        "num_recursions": mor.config.num_recursions,
        "source_parameters": f"{source_model.num_parameters():,}",
        "mor_parameters": f"{mor.num_parameters():,}",
        "sharing_strategy": mor.config.sharing_strategy,
        "init_strategy": args.init_strategy,
        "init_note": init_note,
        "routing": mor.config.routing,
        "capacity": ", ".join(f"{c:.2f}" for c in mor.config.capacity),
        "gating": mor.config.gating,
        "kv_cache_policy": mor.config.kv_cache_policy,
        "relaxation": relaxation,
    }
    if token_ids is not None:
        block_size = plan["block_size"]
        source_ppl, _ = perplexity_and_depths(source_model, token_ids, block_size, desc="source perplexity")
        with full_depth(mor):
            tied_ppl, _ = perplexity_and_depths(mor, token_ids, block_size, desc="tied model perplexity")
        mor_ppl, depths = perplexity_and_depths(mor, token_ids, block_size, desc="MoR perplexity")
        figures.update(
            eval_file=Path(args.eval_file).name,
            eval_tokens=token_ids.numel(),
            eval_block_size=block_size,
            perplexity={
                f"source ({source_name})": source_ppl,
                "recursive (tied) model, every token at full depth": tied_ppl,
                "MoR as converted (untrained routers)": mor_ppl,
            },
            depth_histogram=depth_histogram(depths),
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

    from .cli_checks import choose_threads
    from .measure import format_depth_histogram
    from .output_dir import OutputDirExistsError, staged_output_dir
    from .push_to_hub import InvalidPushError

    args = build_argument_parser().parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    try:
        plan = _check_arguments(args, output_dir)
        print(choose_threads(plan["source_config"]))
        if plan["auto_num_recursions"]:
            print(f"--num-recursions auto: {args.num_recursions} (the smallest the source's {plan['num_layers']} "
                  f"layers allow with --sharing-strategy {args.sharing_strategy})")
        if args.routing is None and plan["routing"] != "expert_choice":
            print(f"note: --sharing-strategy {args.sharing_strategy} cannot route (a router decides at each pass "
                  f"through the shared block); converting with --routing {plan['routing']}.")
        # Loaded before the staging folder exists: weights or an evaluation text that cannot be read leave nothing.
        source_model, tokenizer, token_ids, calibration_ids = _load_source(args, plan)
    except (ValueError, OSError, ImportError, OutputDirExistsError, InvalidPushError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2

    # Everything is written to a staging folder that becomes OUTPUT_DIR only once complete (see output_dir.py).
    try:
        with staged_output_dir(output_dir, overwrite=args.overwrite, inputs=plan["inputs"]) as staging:
            figures = _convert_into(args, plan, source_model, tokenizer, token_ids, calibration_ids, output_dir,
                                    staging)
    except OutputDirExistsError as error:  # OUTPUT_DIR gained other files during the run: it is kept as it is
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2

    num_layers = plan["num_layers"]
    print(f"\nSaved {output_dir} in {time.perf_counter() - start:.0f}s")
    print(f"  source: {figures['source_name']} ({num_layers} layers, {figures['source_parameters']} parameters, "
          f"licence: {figures['license_note']})")
    print(f"  MoR: {figures['sharing_strategy']}, {figures['num_recursions']} recursions, {figures['unique_layers']} unique layers "
          f"(block of {figures['block_size']}), {figures['mor_parameters']} parameters, routing {figures['routing']}")
    for label, value in figures.get("perplexity", {}).items():
        print(f"  perplexity {label}: {value:.2f}")
    if figures.get("depth_histogram"):
        print(f"  recursion depths (tokens per depth): {format_depth_histogram(figures['depth_histogram'])}")

    if args.push_to_hub:
        from .push_to_hub import HubUnreachableError, InvalidPushError, PushError, push_folder

        try:
            result = push_folder(output_dir, args.push_to_hub, private=args.private, token=args.token,
                                 commit_message=args.commit_message)
        except PushError as error:
            print(f"error: {error}", file=sys.stderr)
            # As `mor-push`: bad input and an unreachable Hub exit 2, a refused push 1.
            return 2 if isinstance(error, (InvalidPushError, HubUnreachableError)) else 1
        print(result.describe(output_dir, args.push_to_hub))
    return 0


def command_line() -> int:
    """The `mor-convert` console script (and `python -m conversion.convert_llama_to_mor`): `main`, with Ctrl-C as one
    error line."""
    from .cli_checks import run_command_line

    return run_command_line(main)


if __name__ == "__main__":
    raise SystemExit(command_line())
