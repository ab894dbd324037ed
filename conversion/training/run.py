"""The training run of both command lines, `run_training`: Trainer's arguments, the steps a FLOP budget plans, the
staging folder, training, saving, the evaluation after it, and what it prints at the end."""

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import TrainingArguments, default_data_collator

from modeling_mor.routing_mor import steps_every_token_takes

from ..cli_checks import one_line
from ..flops import layer_applications
from ..measure import calibrate_router_threshold, format_depth_histogram, perplexity_and_depths
from ..model_card import describe_measurement
from ..output_dir import TRAINER_CHECKPOINTS, OutputDirExistsError, foreign_entries, record_output, staged_output_dir
from .data import TrainingData
from .options import CALIBRATION_TOKENS, CheckedArguments
from .router_fit import DEFAULT_ROUTER_FIT_AT, DEFAULT_ROUTER_FIT_TOKENS, ROUTER_FIT_FILE, RouterFitStage, describe_router_fit, estimated_fit_seconds, fit_decision_routers
from .summary import SUMMARY_FILE, save_loss_curve, training_summary
from .trainer import (
    CapacitySchedule,
    MoveIntoPlaceAtFirstCheckpoint,
    UptrainTrainer,
    capacity_schedule_of,
    flop_counter_of,
)


# What Ctrl-C leaves of a training run (see `trainer.MoveIntoPlaceAtFirstCheckpoint`).
INTERRUPTED_RUN = ("a run stopped before its first checkpoint leaves nothing, a later one continues with "
                   "--resume-from-checkpoint latest")


def run_training(args, checked: CheckedArguments, model, tokenizer, data: TrainingData, start: float, *,
                 teacher=None, measure_before: bool = False, finish=None, activity: str = "training") -> int:
    """Trains `model` with `UptrainTrainer` as `args` say (the options of `add_data_arguments` and
    `add_trainer_arguments`), saves it with its tokenizer, a loss curve and OUTPUT_DIR/training_summary.json (steps,
    tokens seen, training FLOPs, the evaluation), and calls `finish(trainer, folder, before, after, depths,
    train_seconds, summary)` before the folder moves into place (uptraining renders its model card there)."""
    capacity_schedule = capacity_schedule_of(args, model)
    output_dir = Path(args.output_dir).expanduser().resolve()
    layer_budget = getattr(args, "layer_budget", None)
    if layer_budget is not None:
        smallest = smallest_layer_fraction(model)
        if layer_budget < smallest:  # before training (this counts the model's relaxation deltas, hence here)
            print(f"error: --layer-budget {layer_budget} is below what this model can spend: every token takes the "
                  f"recursion steps of capacity 1 ({model.config.capacity}), {smallest:.3f} of its layer "
                  f"applications; nothing was written. Fix: give at least {smallest:.3f}, or convert with a capacity "
                  f"below 1 at an earlier step.", file=sys.stderr)
            return 2
    training_args = build_training_arguments(args, output_dir, evaluates=data.eval_dataset is not None)
    if getattr(args, "block_wise_fraction", 0.0) and training_args.world_size > 1:
        # The stage calls the shared layers one by one, outside the forward pass that DDP and FSDP synchronize.
        print(f"error: --block-wise-fraction runs on one process, and this run has {training_args.world_size}; "
              f"nothing was written. Fix: run the stage alone on one process (mor-uptrain --max-steps N "
              f"--block-wise-fraction 1), then train on {training_args.world_size} from its output.",
              file=sys.stderr)
        return 2
    steps_planned = None
    if args.max_train_flops is not None:
        steps_planned = planned_steps(model, args, training_args.world_size, capacity_schedule)
        if args.max_steps is None:
            training_args.max_steps = steps_planned
    max_minutes = getattr(args, "max_minutes", None)
    max_seconds = max_minutes * 60 if max_minutes is not None else None
    router_fit_tokens = getattr(args, "router_fit_tokens", 0)  # None: mor-uptrain's default, on where it can run
    router_fit_at = getattr(args, "router_fit_at", None) or DEFAULT_ROUTER_FIT_AT
    router_fit_blocks = None
    if router_fit_tokens != 0 and training_args.world_size > 1:
        # The fit changes one process's routers between optimizer steps, outside what DDP and FSDP synchronize.
        if router_fit_tokens is not None or getattr(args, "router_fit_at", None) is not None:
            print(f"error: the router fit runs on one process, and this run has {training_args.world_size}; nothing "
                  f"was written. Fix: run on one process, or leave the router fit options out.", file=sys.stderr)
            return 2
        router_fit_tokens = 0
        if training_args.process_index == 0:
            print(f"Router fit: off, it runs on one process and this run has {training_args.world_size}")
    resumed = checked.resume_checkpoint
    if router_fit_tokens is None and resumed and not (Path(resumed) / ROUTER_FIT_FILE).is_file():
        # The default follows the run it resumes: one begun without a fit (asked off, or by an older version) stays so.
        router_fit_tokens = 0
        print(f"Router fit: off, {resumed} was saved by a run without one (--router-fit-tokens N fits anyway)")
    if router_fit_tokens is None:
        router_fit_tokens = DEFAULT_ROUTER_FIT_TOKENS
    if router_fit_tokens:
        router_fit_blocks = calibration_tokens(data.train_dataset, router_fit_tokens).view(-1, args.block_size)
        if max_seconds is not None and router_fit_at >= 1.0:
            # The fit comes after training and inside the time budget: training ends its estimated time early,
            # measured on the device the model trains on (one process: Trainer would move it there itself).
            reserved = estimated_fit_seconds(model.to(training_args.device), router_fit_blocks,
                                             args.per_device_train_batch_size)
            if reserved >= max_seconds:
                print(f"error: --router-fit-tokens {router_fit_tokens} needs about {reserved / 60:.1f} minutes, all of "
                      f"--max-minutes {max_minutes}; nothing was written. Fix: give more --max-minutes or fewer "
                      f"--router-fit-tokens.", file=sys.stderr)
                return 2
            print(f"--router-fit-tokens {router_fit_tokens}: training stops {reserved / 60:.1f} minutes early, the "
                  f"estimated time of the fit")
            max_seconds -= reserved
    lr_follows_clock = max_minutes is not None and args.max_steps is None and args.max_train_flops is None
    if lr_follows_clock:
        # The time budget ends the run; the step count only has to be out of its way.
        training_args.max_steps = CLOCK_RUN_MAX_STEPS
    # A run that continues in OUTPUT_DIR leaves what was there before, and not written by these tools, out of the
    # folder's record (see output_dir.py).
    foreign_before = foreign_entries(output_dir) if checked.in_place else []
    staging = contextlib.ExitStack()
    try:
        with staging:  # on leaving it, a run that is still staged (no checkpoint saved) moves into place
            if not checked.in_place:
                training_args.output_dir = str(staging_folder(staging, output_dir, training_args))
            router_fit_stage = None
            if router_fit_blocks is not None and router_fit_at < 1.0:
                router_fit_stage = RouterFitStage(model, router_fit_blocks, router_fit_at,
                                                  args.per_device_train_batch_size, checked.resume_checkpoint)
            callbacks = [callback for callback in (router_fit_stage, MoveIntoPlaceAtFirstCheckpoint(staging, output_dir))
                         if callback is not None]
            if capacity_schedule is not None:
                callbacks.append(capacity_schedule)
            trainer = UptrainTrainer(
                model=model,
                args=training_args,
                train_dataset=data.train_dataset,
                eval_dataset=data.eval_dataset,
                # The tokenizer goes into every checkpoint and the final folder; the blocks need no padding collator.
                processing_class=tokenizer,
                data_collator=default_data_collator,
                callbacks=callbacks,
                teacher=teacher.to(training_args.device) if teacher is not None else None,
                distill_weight=getattr(args, "distill_weight", 0.5),
                distill_temperature=getattr(args, "distill_temperature", 1.0),
                hidden_distill_weight=getattr(args, "hidden_distill_weight", 0.0),
                block_wise_fraction=getattr(args, "block_wise_fraction", 0.0),
                max_train_flops=args.max_train_flops,
                max_seconds=max_seconds,
                lr_follows_clock=lr_follows_clock,
            )

            if router_fit_stage is not None:
                router_fit_stage.budget = trainer.budget

            before = None
            if measure_before and data.eval_tokens is not None and trainer.is_world_process_zero():
                before, _ = perplexity_and_depths(model, data.eval_tokens, args.eval_block_size,
                                                  desc="perplexity before")
                print(f"Perplexity before {activity}: {before:.2f}")

            trainer.train(resume_from_checkpoint=checked.resume_checkpoint)
            train_seconds = time.perf_counter() - start
            # OUTPUT_DIR, or the staging folder still when no checkpoint was saved (a run resumed at its last step).
            final_dir = Path(training_args.output_dir)
            trainer.save_model(str(final_dir))  # the final model and its tokenizer (every process must call this)
            router_fit = router_fit_stage.report if router_fit_stage is not None else None
            if router_fit_blocks is not None and router_fit_at >= 1.0:
                # After saving: a fit that fails or is interrupted loses no training.
                router_fit = fit_decision_routers(trainer.model, router_fit_blocks, args.per_device_train_batch_size)
                print(f"router fit after training: {describe_router_fit(router_fit)}")
                trainer.save_model(str(final_dir))
            calibration = None
            if layer_budget is not None:
                # After saving: a calibration that fails or is interrupted loses no training. Every process measures
                # the same tokens (an FSDP model needs them all), so every one finds the same threshold.
                try:
                    threshold, spent = calibrate_router_threshold(
                        trainer.model, calibration_tokens(data.train_dataset), layer_budget, args.block_size)
                except ValueError as error:  # the trained model stays saved, at its configured threshold
                    print(f"warning: --layer-budget {layer_budget} not applied: {one_line(error)} The model keeps "
                          f"router_threshold {trainer.model.config.router_threshold}.", file=sys.stderr)
                else:
                    trainer.model.config.router_threshold = threshold
                    if trainer.is_world_process_zero():
                        trainer.model.config.save_pretrained(final_dir)
                    calibration = {"layer_budget": layer_budget, "router_threshold": round(threshold, 6),
                                   "layer_fraction": round(spent, 4)}
            after = depths = None
            # An FSDP-sharded model all-gathers its parameters in every forward: every process runs the measurement.
            if data.eval_tokens is not None and (trainer.is_world_process_zero() or trainer.is_fsdp_enabled):
                after, depths = perplexity_and_depths(trainer.model, data.eval_tokens, args.eval_block_size,
                                                      desc="perplexity after")
            if not trainer.is_world_process_zero():
                return 0
            summary = training_summary(args, trainer, steps_planned, data, after, depths, train_seconds, calibration)
            if router_fit is not None:
                summary["router_fit"] = router_fit
            (final_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            if finish is not None:
                finish(trainer, final_dir, before, after, depths, train_seconds, summary)
            curve_saved = save_loss_curve(trainer.state.log_history, final_dir / "loss_curve.png",
                                          title=f"{type(model).__name__}, {activity}")
            if final_dir == output_dir:  # a staged run is recorded as it moves into place
                record_output(final_dir, also=(TRAINER_CHECKPOINTS,), exclude=foreign_before)
    except OutputDirExistsError as error:  # OUTPUT_DIR gained other files during the run: it is kept as it is
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2

    print(f"\n{activity.capitalize()}: {trainer.state.global_step} steps in {train_seconds / 60:.1f} min; saved "
          f"{output_dir}")
    print(f"  training FLOPs {summary['train_flops']:.4g} ({summary['stopped_by']}), tokens seen "
          f"{summary['tokens_seen']:,}")
    if after is not None:
        measured = describe_measurement({"file": args.eval_file, "tokens": data.eval_tokens.numel(),
                                         "block_size": args.eval_block_size})
        prefix = f"perplexity before {before:.2f} -> after" if before is not None else "perplexity"
        print(f"  {prefix} {after:.2f} ({measured.replace('`', '')})")
        if depths:
            print(f"  recursion depths (tokens per depth): {format_depth_histogram(summary['eval']['depth_histogram'])}, "
                  f"mean {summary['eval']['mean_depth']:.2f}")
    if calibration is not None:
        print(f"  router_threshold {calibration['router_threshold']:.4f}: the training text takes "
              f"{calibration['layer_fraction']:.3f} of the layer applications (--layer-budget {layer_budget})")
    if curve_saved:
        print(f"  loss curve: {output_dir / 'loss_curve.png'}")
    return 0


def build_training_arguments(args, output_dir: Path, evaluates: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        # Without --max-steps, `run_training` plans the steps from the FLOP budget.
        max_steps=args.max_steps if args.max_steps is not None else 1,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if evaluates else "no",
        eval_steps=args.eval_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        activation_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        seed=args.seed,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to=args.report_to,
        disable_tqdm=args.disable_tqdm,
        # Counted over every process (the blocks are packed: every token is a real one).
        include_num_input_tokens_seen="all",
        # Routing can leave a router or a relaxation delta without gradient in a step (no token routed to it).
        ddp_find_unused_parameters=True,
        use_cpu=not torch.cuda.is_available(),
    )


# The step count Trainer is given when the time budget alone ends a run (a bound no CPU or GPU reaches in a budget).
CLOCK_RUN_MAX_STEPS = 10_000_000


# Token-choice depths, and expert-choice depths under --random-capacity, vary from step to step, so their plan (an even
# load; the mean capacities) is an estimate: their schedule gets this many times the planned steps, so that the budget,
# not the step count, ends a run up to that much lighter than planned (the last steps of a cosine schedule run at a
# small fraction of the peak rate).
VARYING_DEPTH_STEP_MARGIN = 1.05


def planned_steps(model, args, world_size: int, capacity_schedule: CapacitySchedule | None = None) -> int:
    """The optimizer steps the FLOP budget is planned to take, from the FLOPs of a training step with the depths
    training is expected to route (`FlopCounter.planned_batch_flops`: exact for vanilla models, routing "none" and
    expert-choice; token-choice at an even load, and random capacities at their mean, with
    `VARYING_DEPTH_STEP_MARGIN`)."""
    counter = flop_counter_of(model)
    varies = getattr(model.config, "routing", None) == "token_choice"
    configured = getattr(model.config, "capacity", None)
    if capacity_schedule is not None and capacity_schedule.random_min is not None:
        varies = True
        model.config.capacity = capacity_schedule.expected_capacity()
    try:
        step_flops = (counter.planned_batch_flops(args.per_device_train_batch_size, args.block_size)
                      * args.gradient_accumulation_steps * world_size)
    finally:
        if configured is not None:
            model.config.capacity = configured
    steps = args.max_train_flops / step_flops
    block_wise = getattr(args, "block_wise_fraction", 0.0)
    if block_wise:
        # The block-wise stage spends its share of the FLOPs in cheaper steps (no end layers, head or routers).
        token_valid = torch.ones(args.per_device_train_batch_size, args.block_size, dtype=torch.bool)
        stage_step_flops = counter.block_wise_flops(token_valid) * args.gradient_accumulation_steps * world_size
        steps = block_wise * args.max_train_flops / stage_step_flops + (1 - block_wise) * steps
    if varies:
        steps *= VARYING_DEPTH_STEP_MARGIN
    return max(1, math.ceil(steps))


def staging_folder(staging: contextlib.ExitStack, output_dir: Path, training_args) -> Path:
    """Enters `staged_output_dir` on the process that saves; every process gets the same staging folder's path."""
    # overwrite=True: check_arguments has already refused an OUTPUT_DIR that may not be replaced.
    folder = (staging.enter_context(staged_output_dir(output_dir, overwrite=True, grows=(TRAINER_CHECKPOINTS,)))
              if training_args.should_save else None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [str(folder) if folder is not None else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        folder = Path(shared[0])
    return folder


def smallest_layer_fraction(model) -> float:
    """The share of its layer applications an expert-choice model spends when every token stops as early as it can:
    after the recursion steps of capacity 1, which every token takes."""
    return layer_applications(model, steps_every_token_takes(model.config)) / model.config.num_hidden_layers


def calibration_tokens(train_dataset, num_tokens: int = CALIBRATION_TOKENS) -> torch.LongTensor:
    """About `num_tokens` training tokens (at least one block) in whole blocks spread evenly over the training data,
    so that the files of a mix are sampled in about their proportion, on which --layer-budget measures the compute."""
    blocks = train_dataset.blocks
    count = max(1, min(len(blocks), num_tokens // blocks.shape[1]))
    chosen = torch.linspace(0, len(blocks) - 1, count).round().long()
    return blocks[chosen].flatten()
