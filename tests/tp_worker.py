"""One rank of a tensor-parallel MoR run, started by tests/test_parallel_plans.py through torchrun (CPU, gloo).

Loads each saved MoR checkpoint with transformers' tensor parallelism (`DistributedConfig(tp_plan="auto")`: the
model's own plan), runs forward passes and short greedy generations, without and with the cache, on the given inputs,
and writes what this rank got (or the error a check raised) to `OUTPUT_DIR/<checkpoint folder name>-rank<r>.pt`, for
the test to compare with one process. One run serves several checkpoints: starting the processes costs most.

    torchrun --nproc_per_node 2 tests/tp_worker.py INPUTS OUTPUT_DIR CHECKPOINT [CHECKPOINT ...]
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import DistributedConfig

from modeling_mor import MoRForCausalLM


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", type=Path, help="a torch file holding a dict with `input_ids` and `attention_mask`")
    parser.add_argument("output_dir", type=Path, help="an existing folder; this rank writes its results into it")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="saved MoR checkpoint folders")
    parser.add_argument("--max_new_tokens", type=int, default=4)
    return parser.parse_args()


def run_checks(checkpoint: Path, inputs: dict, max_new_tokens: int) -> dict:
    model = MoRForCausalLM.from_pretrained(checkpoint, distributed_config=DistributedConfig(tp_plan="auto"))
    model.eval()
    # The local shard's shape of every sharded parameter: shows which modules the plan split.
    local_shapes = {
        name: tuple(parameter.to_local().shape)
        for name, parameter in model.named_parameters()
        if isinstance(parameter, DTensor)
    }
    results = {
        "world_size": dist.get_world_size(),
        "local_shapes": local_shapes,
        "head_is_tied": model.lm_head.weight is model.model.embed_tokens.weight,
    }
    generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    checks = {
        "forward": lambda: model(**inputs, use_cache=False, output_recursion_depth=True),
        "cached_forward": lambda: model(**inputs, use_cache=True, output_recursion_depth=True),
        "generate_uncached": lambda: model.generate(**inputs, **generate_kwargs, use_cache=False),
        "generate": lambda: model.generate(**inputs, **generate_kwargs),
    }
    # Each check runs on its own, so that one that fails (its error is recorded for the test) hides no other.
    for name, check in checks.items():
        try:
            with torch.no_grad():
                output = check()
        except Exception as error:
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        if name.startswith("generate"):
            results[name] = {"sequences": output}
        else:
            results[name] = {"logits": output.logits, "recursion_depth": output.recursion_depth}
    return results


def main():
    args = parse_args()
    # The ranks share the machine's cores with each other (and the test): one thread each.
    torch.set_num_threads(1)
    inputs = torch.load(args.inputs)
    for checkpoint in args.checkpoints:
        results = run_checks(checkpoint, inputs, args.max_new_tokens)
        torch.save(results, args.output_dir / f"{checkpoint.name}-rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
