"""One rank of `mor-uptrain` trained with FSDP2 through accelerate on CPU processes (gloo), started
by tests/test_fsdp.py:

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 2 tests/fsdp_worker.py \\
        REPORT_DIR INPUT_DIR OUTPUT_DIR [uptrain options]

It runs the uptraining command line as it is (`conversion.uptrain.main`), with two additions:

- accelerate (1.15) turns FSDP on only for accelerator devices: on CPU processes it silently trains with DDP instead
  (`AcceleratorState` keeps `DistributedType.MULTI_CPU` and drops the plugin). `enable_fsdp_on_cpu` keeps the plugin
  and sets `DistributedType.FSDP` there, which is what accelerate does on GPUs; everything else (Trainer, the plugin
  built from the launcher's environment, `fully_shard`, the checkpoints) is the ordinary code. On GPUs the worker is
  not needed: `accelerate launch --config_file examples/accelerate/fsdp2.yaml --no_python mor-uptrain ...`.
- `record_fsdp_units` writes REPORT_DIR/rank{N}.json: the `fully_shard` units accelerate made, the parameters each
  one manages, how their parameters are sharded, and how many times each unit ran in the first training forward
  (a shared recursion layer is one unit that runs once per recursion step).
"""

import json
import os
import sys
from collections import Counter
from pathlib import Path


# Started as a script, so sys.path[0] is tests/: the command line is the repository's conversion/ folder (installed,
# the package is named mor_conversion).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def enable_fsdp_on_cpu():
    """Keeps accelerate's FSDP plugin on CPU processes (see the module docstring)."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    initialize = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        initialize(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def record_fsdp_units(report_path: Path):
    """Wraps accelerate's `fsdp2_prepare_model` to describe the model it returns into `report_path`."""
    import accelerate.accelerator
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    prepare = accelerate.accelerator.fsdp2_prepare_model

    def fsdp2_prepare_model(accelerator, model):
        model = prepare(accelerator, model)
        module_names = {}
        for name, module in model.named_modules(remove_duplicate=False):
            module_names.setdefault(id(module), []).append(name or "<root>")
        units = [module for module in model.modules() if isinstance(module, FSDPModule)]  # each module once
        report = {
            "world_size": torch.distributed.get_world_size(),
            "backend": torch.distributed.get_backend(),
            "distributed_type": str(accelerator.distributed_type),
            "is_fsdp2": accelerator.is_fsdp2,
            "units": [],
            "parameters": {},
        }
        calls = Counter()

        def count_call(module, args, kwargs):
            if model.training:
                calls[module_names[id(module)][0]] += 1

        parameter_names = {id(parameter): name for name, parameter in model.named_parameters()}
        group_index = {}
        handles = []
        for unit in units:
            # A `fully_shard` call on several modules (accelerate's tied embeddings with the final norm) makes one
            # parameter group that they share: the unit that all-gathers and reduce-scatters those parameters.
            groups = unit._get_fsdp_state()._fsdp_param_groups
            report["units"].append({
                "names": module_names[id(unit)],  # every path the module is reachable by
                # FSDP2 turns the module's class into a subclass FSDP<Class>: the class before it.
                "class": next(c for c in type(unit).__mro__ if not issubclass(c, FSDPModule)).__name__,
                "groups": [group_index.setdefault(id(group), len(group_index)) for group in groups],
                "managed": [parameter_names[id(p.sharded_param)] for group in groups for p in group.fsdp_params],
            })
            handles.append(unit.register_forward_pre_hook(count_call, with_kwargs=True))
        for name, parameter in model.named_parameters():
            report["parameters"][name] = {
                "dtensor": isinstance(parameter, DTensor),
                "placements": [str(p) for p in parameter.placements] if isinstance(parameter, DTensor) else None,
                "global_shape": list(parameter.shape),
                "local_shape": list(parameter.to_local().shape if isinstance(parameter, DTensor) else parameter.shape),
            }

        def write_after_first_forward(module, args, kwargs, output):
            if not model.training:
                return
            report["calls_in_first_training_forward"] = dict(calls)
            report_path.write_text(json.dumps(report, indent=1))
            for handle in handles:
                handle.remove()
            after_forward.remove()

        after_forward = model.register_forward_hook(write_after_first_forward, with_kwargs=True)
        report_path.write_text(json.dumps(report, indent=1))  # also when no training forward runs
        return model

    accelerate.accelerator.fsdp2_prepare_model = fsdp2_prepare_model


def main(argv):
    report_dir, uptrain_argv = Path(argv[0]), argv[1:]
    enable_fsdp_on_cpu()
    record_fsdp_units(report_dir / f"rank{os.environ['RANK']}.json")
    from conversion.uptrain import main as uptrain_main

    return uptrain_main(uptrain_argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
