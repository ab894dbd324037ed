"""Saves the models the decoding and serving benchmarks compare (`DECODE_VARIANTS` in common.py: vanilla Llama, MoR
routing none, MoR expert-choice with the recursion-wise and the shared KV policy, all of one width and unrolled depth,
routers scaled by `--router-scale` so that eval routing makes mixed decisions) as checkpoints, one folder each, for
benchmarks/vllm_throughput.py. Runs in the project's environment (the MoR model code).

Example:

    python benchmarks/save_decode_models.py outputs/decode-models
"""

import argparse
import re
from pathlib import Path

from common import add_model_arguments, build_decode_models


def folder_name(model_name: str) -> str:
    """"MoR expert, recursion-wise" -> "mor_expert_recursion_wise"."""
    return re.sub(r"[^a-z0-9]+", "_", model_name.lower()).strip("_")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="folder that receives one checkpoint folder per model")
    add_model_arguments(parser, hidden_size=512, num_layers=14)
    parser.add_argument("--router-scale", type=float, default=40.0, help="factor on the random-init router weights")
    args = parser.parse_args()
    args.device = "cpu"
    for name, model in build_decode_models(args).items():
        model.save_pretrained(args.output_dir / folder_name(name))
        print(f"{name}: {args.output_dir / folder_name(name)}")


if __name__ == "__main__":
    main()
