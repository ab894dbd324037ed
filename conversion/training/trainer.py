"""`UptrainTrainer`, the Trainer of both training command lines, and its callbacks: the FLOP and time budget, the expert-choice
capacity schedule, and moving a staged run into place at its first checkpoint."""

import contextlib
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, get_scheduler

from ..flops import FlopCounter


# The resolution of a learning-rate schedule that follows the clock (`UptrainTrainer.create_scheduler`).
CLOCK_SCHEDULE_GRID = 10_000


class UptrainTrainer(Trainer):
    """Trainer whose loss adds distillation from a teacher (KL to its softened logits), which logs every loss term
    (LM, router, distillation) on its own, and which counts the training FLOPs from the recursion depths taken
    (`conversion.flops.FlopCounter`; the teacher's forward passes are not counted), logged as `train_flops` with the
    tokens seen. `max_train_flops` and `max_seconds` stop training once the count or the wall time reaches it
    (`TrainingBudget`); with `lr_follows_clock`, the learning-rate schedule runs on the share of `max_seconds` spent
    rather than on steps. Vanilla Llama models train with it too (the plain LM loss; every token at full depth)."""

    def __init__(self, *args, teacher=None, distill_weight=0.5, distill_temperature=1.0, hidden_distill_weight=0.0,
                 block_wise_fraction=0.0, max_train_flops=None, max_seconds=None, lr_follows_clock=False, **kwargs):
        model = kwargs.get("model")
        # Trainer sets `config.use_cache = args.use_cache` (False) for training; what is saved keeps the model's own.
        self.saved_use_cache = getattr(getattr(model, "config", None), "use_cache", True)
        super().__init__(*args, **kwargs)
        # Trainer takes a model whose forward accepts **kwargs to scale its own loss for gradient accumulation (from
        # `num_items_in_batch`); `compute_loss` returns a micro-batch's mean loss, which Trainer must divide itself.
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature
        self.hidden_distill_weight = hidden_distill_weight
        self.hidden_boundaries = recursion_boundaries(self.model.config) if hidden_distill_weight else []
        self.block_wise_fraction = block_wise_fraction
        self.block_wise_positions = block_wise_positions(self.model) if block_wise_fraction else []
        self._loss_terms: dict[str, list[float]] = {}
        self.flop_counter = flop_counter_of(self.model)
        if max_train_flops is not None and self.flop_counter is None:
            raise ValueError(f"a FLOP budget needs a model whose FLOPs can be counted (a Llama or an MoR causal LM), "
                             f"not a {type(self.model).__name__}.")
        self._micro_batch_flops = None
        self.budget = TrainingBudget(self, max_train_flops, max_seconds)
        self.add_callback(self.budget)
        self.lr_follows_clock = lr_follows_clock

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Trainer's schedule, or with `lr_follows_clock` the same warm-up (in steps) followed by the decay of
        `args.lr_scheduler_type` over the time budget: transformers' own schedule of that type, read at the share of
        the budget spent (on a grid of `CLOCK_SCHEDULE_GRID` points)."""
        if not self.lr_follows_clock:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            shape = get_scheduler(self.args.lr_scheduler_type, torch.optim.SGD([torch.zeros(1)], lr=1.0),
                                  num_warmup_steps=0, num_training_steps=CLOCK_SCHEDULE_GRID).lr_lambdas[0]

            def factor(step: int) -> float:
                if step < warmup:
                    return step / max(1, warmup)
                return shape(min(CLOCK_SCHEDULE_GRID, int(self.budget.elapsed_fraction() * CLOCK_SCHEDULE_GRID)))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def in_block_wise_stage(self) -> bool:
        """Whether the micro-batch being trained belongs to the block-wise stage: the first `block_wise_fraction` of
        the run's budget (`TrainingBudget.spent_fraction`). Asked per micro-batch, so under a time or FLOP budget the
        optimizer step that crosses the boundary may mix both losses."""
        return self.block_wise_fraction > 0 and self.budget.spent_fraction() < self.block_wise_fraction

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.in_block_wise_stage():
            return self.block_wise_loss(model, inputs)
        counts_depth = self.flop_counter is not None and self.flop_counter.is_mor
        distills_hidden = bool(self.hidden_boundaries) and self.teacher is not None and model.training
        extra = {"output_recursion_depth": True} if counts_depth else {}
        if distills_hidden:
            extra["output_hidden_states"] = True
        outputs = model(**inputs, **extra)
        if model.training and self.flop_counter is not None:
            token_valid = inputs.get("attention_mask")
            if token_valid is None:
                token_valid = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
            self._micro_batch_flops = self.flop_counter.batch_flops(
                token_valid, outputs.recursion_depth if counts_depth else None
            )
        loss = outputs.loss
        # A vanilla model's loss is the LM loss.
        terms = {"lm_loss": outputs.lm_loss if getattr(outputs, "lm_loss", None) is not None else outputs.loss}
        for name in ("router_aux_loss", "balance_loss", "router_z_loss"):
            if getattr(outputs, name, None) is not None:
                terms[name] = getattr(outputs, name)
        if self.teacher is not None and model.training:
            with torch.no_grad():
                teacher_outputs = self.teacher(input_ids=inputs["input_ids"], output_hidden_states=distills_hidden)
            teacher_logits = teacher_outputs.logits
            temperature = self.distill_temperature
            distill_loss = F.kl_div(
                F.log_softmax(outputs.logits.float() / temperature, dim=-1),
                F.log_softmax(teacher_logits.float() / temperature, dim=-1),
                log_target=True,
                reduction="batchmean",
            ) * temperature**2 / outputs.logits.shape[1]
            loss = (1 - self.distill_weight) * loss + self.distill_weight * distill_loss
            terms["distill_loss"] = distill_loss
            if distills_hidden:
                hidden_loss = torch.stack([
                    channel_standardized_distance(outputs.hidden_states[index], teacher_outputs.hidden_states[index],
                                                  teacher_outputs.hidden_states[index])
                    for index in self.hidden_boundaries
                ]).mean()
                loss = loss + self.hidden_distill_weight * hidden_loss
                terms["hidden_distill_loss"] = hidden_loss
        if model.training:
            for name, value in terms.items():
                self._loss_terms.setdefault(name, []).append(value.detach().float().item())
        return (loss, outputs) if return_outputs else loss

    def block_wise_loss(self, model, inputs):
        """The block-wise stage's loss: every shared layer, at every recursion step, is fed the teacher's hidden
        states at its unrolled position and compared with the teacher's next ones (`channel_standardized_distance`), so
        each layer learns the source layers it replaces without the error of the layers before it. One micro-batch costs
        the teacher's forward pass and each shared layer's own forward and backward (no head, no routing)."""
        with torch.no_grad():
            teacher_states = self.teacher(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states
        base = self.accelerator.unwrap_model(model).model
        # The layers are called outside the model's forward, which accelerate's mixed precision (--bf16) wraps.
        with self.accelerator.autocast():
            outputs = base.unrolled_layer_forward({position: teacher_states[position]
                                                   for position in self.block_wise_positions})
        # Each layer's distance in units of the teacher's update there (next states - inputs): what it adds.
        loss = torch.stack([
            channel_standardized_distance(output, teacher_states[position + 1],
                                          teacher_states[position + 1] - teacher_states[position])
            for position, output in outputs.items()
        ]).mean()
        self._loss_terms.setdefault("block_wise_loss", []).append(loss.detach().float().item())
        if self.flop_counter is not None:
            token_valid = torch.ones_like(inputs["input_ids"], dtype=torch.bool)
            self._micro_batch_flops = self.flop_counter.block_wise_flops(token_valid)
        return loss

    def floating_point_ops(self, inputs) -> float:
        """The FLOPs of the micro-batch just trained, counted by `compute_loss` from its recursion depths (Trainer
        calls this after every training step and adds it to `state.total_flos`, which checkpoints keep)."""
        if self.flop_counter is None:
            return super().floating_point_ops(inputs)
        flops, self._micro_batch_flops = self._micro_batch_flops, None
        return flops or 0.0

    def save_model(self, output_dir=None, _internal_call=False):
        """Saves with the model's own `use_cache` (the final model and every checkpoint), training goes on without."""
        config = self.model.config
        training_use_cache = config.use_cache
        config.use_cache = self.saved_use_cache
        try:
            super().save_model(output_dir, _internal_call=_internal_call)
        finally:
            config.use_cache = training_use_cache

    def _save(self, output_dir=None, state_dict=None):
        """Saves a sharded model (FSDP2, DeepSpeed) as a one-process run saves it. Their gathered state dicts hold
        the tied head and the embeddings as two tensors, which `save_pretrained` (which finds ties by storage) would
        both write: the head is dropped, as `tie_word_embeddings` restores it on loading. And FSDP2's `fully_shard`
        turns the model's class into a subclass FSDP<Class> defined in torch, for which `save_pretrained` would write
        torch's FSDP source files as the model's code and point config.json's auto_map at them: the model saves as
        its own class."""
        from torch.distributed.fsdp import FSDPModule

        head = self.model.get_output_embeddings()
        if state_dict is not None and head is not None and head.weight is self.model.get_input_embeddings().weight:
            head_names = {f"{name}.weight" for name, module in self.model.named_modules() if module is head}
            state_dict = {name: tensor for name, tensor in state_dict.items() if name not in head_names}
        model_class = type(self.model)
        if not issubclass(model_class, FSDPModule):
            return super()._save(output_dir, state_dict=state_dict)
        self.model.__class__ = next(cls for cls in model_class.__mro__ if not issubclass(cls, FSDPModule))
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            self.model.__class__ = model_class

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            # Every process logs a training step (Trainer gathers the loss there), so the terms are averaged over
            # the processes here, as Trainer averages the loss: the global batch's, not the main process's part.
            names = sorted(self._loss_terms)
            local = torch.tensor([sum(self._loss_terms[n]) / len(self._loss_terms[n]) for n in names],
                                 device=self.args.device)
            means = self.accelerator.reduce(local, reduction="mean") if names else local
            for name, value in zip(names, means.tolist()):
                logs[name] = round(value, 4)
            self._loss_terms = {}
            # Trainer sums the count (store_flos) just before it logs; current_flos is what a later log adds.
            logs["train_flops"] = self.state.total_flos + self.current_flos
        super().log(logs, *args, **kwargs)


def flop_counter_of(model) -> FlopCounter | None:
    """A `FlopCounter` for `model` (DDP-unwrapped), or None for a model it does not know (a PEFT wrapper, another
    architecture): Trainer's own 6 * parameters * tokens count is used then."""
    try:
        return FlopCounter(model)
    except AttributeError:
        return None


def recursion_boundaries(config) -> list[int]:
    """The indices, in a model's `hidden_states` output (embeddings first, then each unrolled layer's output), of the
    hidden states where an MoR model's recursion steps end, which the source model also has: after the first layer
    and B shared layers for step 1, after B more for step 2, and so on (cycle strategies). The final layer's output is
    left out (it is returned after the final norm)."""
    if getattr(config, "model_type", None) != "mor" or not config.sharing_strategy.endswith("cycle"):
        raise ValueError("--hidden-distill-weight matches the hidden states where recursion steps end: it needs an MoR "
                         "model with a cycle or middle_cycle strategy. Fix: leave --hidden-distill-weight out.")
    offset = 1 if config.has_unshared_ends else 0
    ends = [offset + step * config.block_size for step in range(1, config.num_recursions + 1)]
    return [index for index in ends if index < config.num_hidden_layers]


def channel_standardized_distance(student: torch.Tensor, teacher: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of the student's and the teacher's hidden states, each channel measured in units of
    its spread in `scale` over the batch's tokens (the teacher's states themselves, or its layer's update): a residual
    stream has a few channels of very large magnitude, which would otherwise be all that a plain MSE or cosine
    distance sees. The hidden-state term of distillation and the block-wise stage both use it."""
    spread = scale.float().std(dim=(0, 1), keepdim=True) + 1e-6
    return (((student.float() - teacher.float()) / spread) ** 2).mean()


def check_block_wise_stage(sharing_strategy: str, kv_cache_policy: str) -> None:
    """Refuses a layout the block-wise stage cannot train (ValueError, one line naming the fix)."""
    if kv_cache_policy != "recursion_wise":
        raise ValueError(f"--block-wise-fraction trains each shared layer on the source's hidden states, and under "
                         f"--kv-cache-policy {kv_cache_policy} a deeper step reads step 1's keys and values, which the "
                         f"source has no counterpart of; nothing was written. Fix: leave --block-wise-fraction out, or "
                         f"convert with the recursion_wise policy.")
    if not sharing_strategy.startswith("middle_"):
        raise ValueError(f"--block-wise-fraction needs a model whose last layer is not shared (middle_cycle or "
                         f"middle_sequence, not {sharing_strategy}): the source's hidden state after its last layer "
                         f"is returned normalized, so the last shared layer would have no target; nothing was written. "
                         f"Fix: convert with a middle_* strategy, or leave --block-wise-fraction out.")


def block_wise_positions(model) -> list[int]:
    """The unrolled positions the block-wise stage trains: those of the shared layers, each at its recursion step."""
    check_block_wise_stage(model.config.sharing_strategy, model.config.kv_cache_policy)
    unrolled = model.model.unrolled_layers(with_recursion_step=True)
    return [position for position, (_, step) in enumerate(unrolled) if step is not None]


class TrainingBudget(TrainerCallback):
    """The compute budget of a run: training FLOPs (Trainer's `state.total_flos`, the depth-aware count of
    `UptrainTrainer.floating_point_ops`, summed over every process) and wall time (seconds since training began in
    this process). Training stops at the end of the first optimizer step that reaches either: the budget is checked
    right after the step that crosses it, so a run overshoots by less than one step and never stops short of it. That
    step is saved (and evaluated, with evaluation on), as the last step of a run that reaches max_steps is. `reached`
    names the budget that stopped the run ("FLOP budget" or "time budget"), None while neither has.

    With a time budget and no step count, the learning rate follows the clock (`elapsed_fraction`; see
    `UptrainTrainer.create_scheduler`), so that its schedule ends when the time does."""

    def __init__(self, trainer: Trainer, max_flops: float | None = None, max_seconds: float | None = None):
        self.trainer = trainer
        self.max_flops = max_flops
        self.max_seconds = max_seconds
        self.reached = None
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def elapsed_fraction(self) -> float:
        """The share of the time budget spent so far, agreed by every process (the largest)."""
        elapsed = torch.tensor((time.perf_counter() - self.started) / self.max_seconds, dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        return float(elapsed)

    def spent_fraction(self) -> float:
        """The share of the run's budget spent: of its FLOPs or its time (whichever is further; the run ends at the
        first to reach 1), or of its steps when no FLOP or time budget is given. A resumed run counts its time from
        the resume, as the time budget does."""
        state, fractions = self.trainer.state, []
        if self.max_flops is not None:
            fractions.append((state.total_flos + self.trainer.current_flos) / self.max_flops)
        if self.max_seconds is not None:
            fractions.append(self.elapsed_fraction())
        return max(fractions) if fractions else state.global_step / self.trainer.args.max_steps

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_flops is not None:
            # Every process ends the step together, so the count's all-gather (under DDP) is safe here.
            self.trainer.store_flos()
            if state.total_flos >= self.max_flops:
                self.reached = "FLOP budget"
        if self.reached is None and self.max_seconds is not None and self.elapsed_fraction() >= 1.0:
            self.reached = "time budget"
        if self.reached is not None:
            control.should_training_stop = True
            if args.save_strategy == "steps":
                control.should_save = True
            if args.eval_strategy == "steps":
                control.should_evaluate = True


class CapacitySchedule(TrainerCallback):
    """The expert-choice capacities (`config.capacity`) each optimizer step trains with: set before the step, and the
    configured ones restored after it and at the end of training, so that evaluation, every checkpoint and the final
    model keep the configured capacities (which eval-mode routing reads: a step of capacity 1 makes no decision).

    - Warm-up (`warmup_steps`): every step starts at capacity 1 (all tokens at full depth) and moves linearly to its
      target over `warmup_steps`, so the routers learn before they start dropping tokens.
    - Random capacities (`random_min`): every optimizer step draws its own target: the first recursion step keeps its
      configured capacity c_1 and the later steps' capacities are N_r - 1 draws, uniform in [random_min, c_1], sorted
      non-increasing (a mean training depth anywhere from c_1 + (N_r - 1) * random_min to N_r * c_1). The model
      learns to work at any depth, and each router's sigmoid, trained by the BCE against top-k decisions taken at
      varying capacities, learns the probability that a token is kept: a ranking, so that `router_threshold` at
      inference trades quality for compute on one checkpoint. The draws depend on `seed` and the step only: every
      process draws the same, and a resumed run draws what the straight run drew.
    """

    def __init__(self, model, warmup_steps: int = 0, random_min: float | None = None, seed: int = 0):
        self.config = model.config
        self.configured = list(model.config.capacity)
        self.warmup_steps = warmup_steps
        self.random_min = random_min
        self.seed = seed

    def target_at(self, step: int) -> list[float]:
        """The capacities step `step` routes to after warm-up: the configured ones, or this step's random draw."""
        if self.random_min is None:
            return list(self.configured)
        first = self.configured[0]
        draws = random.Random(f"capacity-{self.seed}-{step}")
        later = sorted((draws.uniform(self.random_min, first) for _ in self.configured[1:]), reverse=True)
        return [first, *later]

    def expected_capacity(self) -> list[float]:
        """The mean capacities over the steps (the k-th largest of n uniform draws on [a, b] averages
        a + (b - a) * (n + 1 - k) / (n + 1)), which the FLOP budget plans with."""
        if self.random_min is None:
            return list(self.configured)
        first, draws = self.configured[0], len(self.configured) - 1
        return [first, *(self.random_min + (first - self.random_min) * (draws + 1 - k) / (draws + 1)
                         for k in range(1, draws + 1))]

    def capacity_at(self, step: int) -> list[float]:
        progress = min(1.0, step / max(1, self.warmup_steps)) if self.warmup_steps else 1.0
        return [1.0 - progress * (1.0 - target) for target in self.target_at(step)]

    def on_step_begin(self, args, state, control, **kwargs):
        self.config.capacity = self.capacity_at(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer logs, evaluates and saves right after this: with the configured capacities.
        self.config.capacity = list(self.configured)


def capacity_schedule_of(args, model) -> CapacitySchedule | None:
    """The `CapacitySchedule` of --capacity-warmup-steps and --random-capacity, or None when neither is given."""
    warmup_steps, random_min = getattr(args, "capacity_warmup_steps", 0), getattr(args, "random_capacity", None)
    if not warmup_steps and random_min is None:
        return None
    return CapacitySchedule(model, warmup_steps, random_min, seed=args.seed)


class MoveIntoPlaceAtFirstCheckpoint(TrainerCallback):
    """A new run trains into a hidden staging folder (see `output_dir.staged_output_dir`), so that one stopped before
    its first checkpoint leaves nothing behind. Once that checkpoint is complete, the folder moves into place as
    OUTPUT_DIR, where later checkpoints and the final model land and where `--resume-from-checkpoint latest` finds
    them: a run stopped after it can be resumed."""

    def __init__(self, staging: contextlib.ExitStack, output_dir: Path):
        self.staging = staging
        self.output_dir = output_dir

    def on_save(self, args, state, control, **kwargs):
        if args.output_dir == str(self.output_dir):
            return
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # every process has written its part of the checkpoint (its RNG state)
            torch.distributed.barrier()
        self.staging.close()  # renames the staging folder to OUTPUT_DIR, on the process that made it
        if distributed:  # no process writes again before the folder has moved
            torch.distributed.barrier()
        args.output_dir = str(self.output_dir)
