"""PEFT LoRA on MoR models: one adapter per shared layer serves every recursion step; routers optionally trained;
Trainer; save/load and merge; generate with the MoRCache; clear errors for bad targets; the fine-tuning example."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments


from conftest import import_or_missing  # noqa: E402

peft = import_or_missing("peft", "peft is not installed (pip install -e '.[peft]'; the dev extra has it)")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from conversion.output_dir import record_output  # noqa: E402
from modeling_mor import MoRCache, MoRForCausalLM  # noqa: E402
from modeling_mor.peft_mor import (  # noqa: E402
    DEFAULT_LORA_TARGET_MODULES,
    LLAMA_PROJECTIONS,
    check_lora_target_modules,
    lora_target_modules,
    router_linear_names,
)

from conftest import edited_model_copy, mixed_routing_model, tiny_mor_config, with_config_fields  # noqa: E402
from test_save_load import run_isolated  # noqa: E402
from test_training import RepeatingTokens  # noqa: E402


REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PATH = REPOSITORY_ROOT / "examples" / "finetune_lora.py"
INSTRUCTIONS_PATH = REPOSITORY_ROOT / "examples" / "data" / "instructions.jsonl"


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster than two on a shared machine, where threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**overrides):
    """middle_cycle, L = 8, N_r = 3: 4 unique layers (first, 2 shared, last) unrolled to 8."""
    fields = dict(pad_token_id=0, eos_token_id=None, bos_token_id=None)
    fields.update(overrides)
    return mixed_routing_model(MoRForCausalLM(tiny_mor_config(**fields))).eval()


def lora_config(target_modules, **overrides):
    # init_lora_weights=False gives lora_B random values, so that an untrained adapter already changes the output.
    fields = dict(r=4, lora_alpha=8, target_modules=target_modules, task_type="CAUSAL_LM", init_lora_weights=False)
    fields.update(overrides)
    return LoraConfig(**fields)


def lora_layers(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def test_default_targets_and_router_names():
    assert DEFAULT_LORA_TARGET_MODULES == ("q_proj", "v_proj")
    model = tiny_model()
    assert router_linear_names(model) == [f"model.recursion_block.routing.routers.{step}.scorer" for step in range(3)]
    mlp_routers = tiny_model(router_type="mlp", router_inference="auxiliary")
    names = router_linear_names(mlp_routers)
    # Three step routers and the auxiliary routers of the two steps that decide (capacity < 1), two Linear each.
    assert len(names) == 2 * (3 + 2) and all(name.endswith(("scorer.0", "scorer.2")) for name in names)
    assert len(router_linear_names(tiny_model(routing="token_choice"))) == 1
    assert router_linear_names(tiny_model(routing="none")) == []
    assert lora_target_modules(model, routers=True) == ["q_proj", "v_proj", *router_linear_names(model)]


def test_one_adapter_per_shared_layer_serves_every_recursion_step():
    model = tiny_model()
    config = model.config
    peft_model = get_peft_model(model, lora_config(list(LLAMA_PROJECTIONS)))
    layers = lora_layers(peft_model)
    assert config.num_unique_layers == 4 and config.num_hidden_layers == 8
    assert len(layers) == config.num_unique_layers * len(LLAMA_PROJECTIONS)  # 28, not 8 * 7
    num_lora_parameters = sum(1 for name, _ in peft_model.named_parameters() if "lora_" in name)
    assert num_lora_parameters == 2 * config.num_unique_layers * len(LLAMA_PROJECTIONS)

    calls = {name: 0 for name in layers}

    def count_call(name):
        def hook(module, inputs, output):
            calls[name] += 1

        return hook

    for name, module in layers.items():
        module.register_forward_hook(count_call(name))
    peft_model.train()  # training routing: every step takes its top-k tokens, so all three steps run
    input_ids = torch.randint(1, config.vocab_size, (2, 12))
    peft_model(input_ids=input_ids, labels=input_ids)
    for name, count in calls.items():
        expected = config.num_recursions if ".recursion_block.layers." in name else 1
        assert count == expected, (name, count)


@pytest.mark.parametrize(
    "overrides",
    [dict(routing="expert_choice"), dict(routing="expert_choice", router_type="mlp"), dict(routing="token_choice")],
    ids=["expert_choice", "expert_choice-mlp", "token_choice"],
)
@pytest.mark.parametrize("router_mode", ["lora", "full"])
def test_router_training_gets_gradients(overrides, router_mode):
    model = tiny_model(**overrides)
    router_names = router_linear_names(model)
    if router_mode == "lora":
        config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", *router_names], task_type="CAUSAL_LM")
    else:
        config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=router_names, task_type="CAUSAL_LM"
        )
    peft_model = get_peft_model(model, config).train()
    input_ids = torch.randint(1, model.config.vocab_size, (2, 12))
    peft_model(input_ids=input_ids, labels=input_ids).loss.backward()

    trainable = {name: parameter for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    if router_mode == "lora":
        # lora_B starts at zero, so its gradient is the one that is non-zero at the first step.
        router_parameters = {name: p for name, p in trainable.items() if ".scorer" in name and "lora_B" in name}
        assert len(router_parameters) == len(router_names)
    else:
        router_parameters = {name: p for name, p in trainable.items() if "modules_to_save" in name}
        assert len(router_parameters) == len(router_names)
    for name, parameter in router_parameters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Only adapters and the routers' trainable copies are trainable.
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)


def test_trainer_lowers_the_loss_training_only_lora(tmp_path):
    model = MoRForCausalLM(tiny_mor_config())
    with torch.no_grad():
        # A random LM head of std 0.02 caps the logits near +-0.6, and LoRA leaves it frozen: give it room.
        model.lm_head.weight.mul_(10.0)
    base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM")
    )
    trainable = [name for name, parameter in peft_model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=peft_model, args=arguments, train_dataset=RepeatingTokens(model.config.vocab_size))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    # The base weights are untouched (LoRA keeps each wrapped Linear as its `base_layer`).
    trained_base = {
        name.replace(".base_layer", ""): tensor
        for name, tensor in peft_model.get_base_model().state_dict().items()
        if "lora_" not in name
    }
    assert trained_base.keys() == base_state.keys()
    for name, tensor in base_state.items():
        assert torch.equal(trained_base[name], tensor), name


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    model = tiny_model()
    targets = [*LLAMA_PROJECTIONS, *router_linear_names(model)]
    peft_model = get_peft_model(model, lora_config(targets)).train()
    input_ids = torch.randint(1, model.config.vocab_size, (2, 12))

    def loss_and_gradients():
        peft_model.zero_grad()
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    plain_loss, plain_gradients = loss_and_gradients()
    peft_model.gradient_checkpointing_enable()
    assert peft_model.get_base_model().is_gradient_checkpointing
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    assert len(plain_gradients) == 2 * len(lora_layers(peft_model))
    assert torch.allclose(plain_loss, checkpointed_loss, atol=1e-6)
    assert plain_gradients.keys() == checkpointed_gradients.keys()
    for name, gradient in plain_gradients.items():
        assert torch.allclose(gradient, checkpointed_gradients[name], atol=1e-6), name


@pytest.mark.parametrize(
    "router_mode, overrides",
    [("lora", {}), ("full", {}), ("lora", {"relaxation_rank": 2})],
    ids=["lora-routers", "full-routers", "lora-routers-relaxed"],
)
def test_saved_adapter_reloads_and_merges_exactly(tmp_path, router_mode, overrides):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base_model = tiny_model(**overrides)
    with torch.no_grad():  # depth-specific relaxation deltas (zero when fresh) that matter
        for name, parameter in base_model.named_parameters():
            if "relaxation_" in name:
                parameter.normal_(0.0, 0.05)
    base_model.save_pretrained(base_dir)
    model = MoRForCausalLM.from_pretrained(base_dir).eval()
    router_names = router_linear_names(model)
    if router_mode == "lora":
        config = lora_config([*LLAMA_PROJECTIONS, *router_names])
    else:
        config = lora_config(list(LLAMA_PROJECTIONS), modules_to_save=router_names)
    peft_model = get_peft_model(model, config).eval()
    if router_mode == "full":
        with torch.no_grad():  # a trained router differs from the base one
            for name, parameter in peft_model.named_parameters():
                if "modules_to_save" in name:
                    parameter.add_(0.5 * torch.randn_like(parameter))
    input_ids = torch.randint(1, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=input_ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=input_ids).logits
    peft_model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"

    reloaded = PeftModel.from_pretrained(MoRForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=input_ids).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(input_ids).logits
    assert torch.equal(reloaded_logits, adapter_logits)
    assert isinstance(merged, MoRForCausalLM) and not lora_layers(merged)
    # LoRA wraps (and merges into) the relaxed projections, whose per-step deltas keep applying.
    merged_projection = merged.model.recursion_block.layers[0].self_attn.q_proj
    assert type(merged_projection).__name__ == ("RelaxedLinear" if overrides else "Linear")
    assert (merged_logits - adapter_logits).abs().max().item() <= 1e-5
    assert not torch.allclose(base_logits, adapter_logits), "the adapter should change the output"


@pytest.mark.parametrize(
    "overrides", [dict(routing="expert_choice"), dict(routing="token_choice", kv_cache_policy="shared")]
)
def test_generate_through_peft_uses_mor_cache(overrides):
    model = tiny_model(**overrides)
    peft_model = get_peft_model(model, lora_config(list(LLAMA_PROJECTIONS))).eval()
    prompt = torch.randint(1, model.config.vocab_size, (1, 7))
    cached = peft_model.generate(
        input_ids=prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_recursion_depth=True
    )
    uncached = peft_model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert isinstance(cached.cache, MoRCache)
    assert torch.equal(cached.sequences, uncached)
    with torch.no_grad():
        full = peft_model(input_ids=cached.sequences, output_recursion_depth=True)
    assert torch.equal(cached.recursion_depth, full.recursion_depth)
    assert full.recursion_depth.min() < full.recursion_depth.max(), "routers should make mixed decisions"


def test_get_peft_model_prints_no_future_warning():
    """Issue 23, item 7: PEFT reads the deprecated `is_gradient_checkpointing`, and transformers warned on every LoRA
    run (finetune_lora.py printed it)."""
    import warnings

    model = tiny_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(model, lora_config(["q_proj"]))
        assert model.is_gradient_checkpointing is False
        model.activation_checkpointing_enable()
        assert model.is_gradient_checkpointing is True
    assert [str(warning.message) for warning in caught if "checkpointing" in str(warning.message)] == []


def test_unmatched_target_error_names_the_modules_that_exist():
    model = tiny_model()
    with pytest.raises(ValueError) as error:
        check_lora_target_modules(model, ["qproj", "v_proj"])
    message = str(error.value)
    assert "['qproj']" in message and "match no module of this MoRForCausalLM" in message
    for expected in ("q_proj", "down_proj", "model.recursion_block.layers.0.self_attn", "model.first_layer.mlp",
                     "scorer", "model.recursion_block.routing.routers.2"):
        assert expected in message, expected
    with pytest.raises(ValueError, match="'self_attn' matches only modules of type MoRAttention"):
        check_lora_target_modules(model, ["self_attn"])
    with pytest.raises(ValueError, match="target_modules is empty"):
        check_lora_target_modules(model, [])
    check_lora_target_modules(model, ["q_proj", "model.recursion_block.routing.routers.0.scorer"])
    check_lora_target_modules(model, "all-linear")  # strings (all-linear, a regex) are left to PEFT

    # What PEFT alone says: only when no target matches anything, and without listing module names.
    with pytest.raises(ValueError, match="not found in the base model") as peft_error:
        get_peft_model(tiny_model(), LoraConfig(target_modules=["qproj"], task_type="CAUSAL_LM"))
    assert "q_proj" not in str(peft_error.value)


def test_remote_code_model_takes_lora_in_a_fresh_process(tmp_path):
    """PEFT on a model loaded with trust_remote_code where the project cannot be imported; the adapter it saves loads
    onto the locally imported class with the same logits."""
    model = tiny_model()
    checkpoint, adapter_dir = tmp_path / "checkpoint", tmp_path / "adapter"
    model.save_pretrained(checkpoint)
    input_ids = torch.randint(1, model.config.vocab_size, (2, 10))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    targets = ["q_proj", "v_proj", *router_linear_names(model)]
    output = run_isolated(
        f"""
        import torch
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        config = LoraConfig(r=4, target_modules={targets!r}, task_type="CAUSAL_LM", init_lora_weights=False)
        peft_model = get_peft_model(model, config).eval()
        print("lora_layers", sum(isinstance(module, LoraLayer) for module in peft_model.modules()))
        input_ids = torch.load({str(tmp_path / "input_ids.pt")!r})
        with torch.no_grad():
            torch.save(peft_model(input_ids=input_ids).logits, {str(tmp_path / "logits.pt")!r})
        prompt = input_ids[:1, :6]
        cached = peft_model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        uncached = peft_model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, use_cache=False)
        print("cache", type(cached.cache).__name__, torch.equal(cached.sequences, uncached))
        peft_model.save_pretrained({str(adapter_dir)!r})
        """,
        cwd=tmp_path,
    )
    assert f"lora_layers {2 * model.config.num_unique_layers + 3}" in output
    assert "cache MoRCache True" in output
    reloaded = PeftModel.from_pretrained(MoRForCausalLM.from_pretrained(checkpoint), adapter_dir).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=input_ids).logits
    assert (logits - torch.load(tmp_path / "logits.pt")).abs().max().item() <= 1e-6


def load_example_module():
    spec = importlib.util.spec_from_file_location("finetune_lora", EXAMPLE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_help(capsys):
    example = load_example_module()
    assert "python examples/finetune_lora.py" in example.__doc__
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("MODEL", "OUTPUT_DIR", "--train-file", "--format", "--lora-r", "--lora-alpha", "--target-modules",
                   "--lora-routers", "--max-steps", "--eval-file"):
        assert option in help_text, option


def test_example_docstring_loads_the_adapter_with_trust_remote_code():
    example = load_example_module()
    snippet = example.__doc__.split("Load the adapter afterwards with:")[1]
    assert 'AutoModelForCausalLM.from_pretrained("mor-stories260K", trust_remote_code=True)' in snippet


def folder_digest(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_example_expecting_error(capsys, arguments) -> str:
    """Runs the example, which must stop with exit code 2 and one `error:` line on stderr; returns that line."""
    example = load_example_module()
    with pytest.raises(SystemExit) as exit_info:
        example.main(arguments)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Loaded" not in captured.out  # refused before the model was loaded
    return lines[0]


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "inside"])
def test_example_refuses_an_output_dir_that_is_the_model(tmp_path, converted_stories_dir, capsys, monkeypatch,
                                                         spelling):
    before = folder_digest(converted_stories_dir)
    monkeypatch.chdir(converted_stories_dir.parent)
    link = tmp_path / "link"
    link.symlink_to(converted_stories_dir)
    output_dir = {
        "same": str(converted_stories_dir),
        "relative": f"./{converted_stories_dir.name}/../{converted_stories_dir.name}",
        "symlink": str(link),
        "inside": str(converted_stories_dir / "adapter"),
    }[spelling]
    line = run_example_expecting_error(capsys, [
        str(converted_stories_dir), output_dir, "--train-file", str(INSTRUCTIONS_PATH), "--format", "instructions",
    ])
    assert "MODEL" in line and "Nothing was written" in line
    assert folder_digest(converted_stories_dir) == before


@pytest.mark.parametrize("held_out", [True, False])
def test_example_says_when_the_training_file_is_too_small(tmp_path, converted_stories_dir, capsys, held_out):
    train_file = tmp_path / "tiny.txt"
    train_file.write_text("Once upon a time there was a cat.", encoding="utf-8")
    eval_arguments = [] if held_out else ["--eval-file", str(train_file)]
    line = run_example_expecting_error(capsys, [
        str(converted_stories_dir), str(tmp_path / "out"), "--train-file", str(train_file), *eval_arguments,
        "--block-size", "64",
    ])
    assert str(train_file) in line and "--block-size" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["bad_json", "missing_field", "not_utf8", "empty", "missing_file"])
def test_example_names_the_file_and_line_of_bad_instructions(tmp_path, converted_stories_dir, capsys, problem):
    train_file = tmp_path / "instructions.jsonl"
    good = json.dumps({"instruction": "Say hi.", "response": "Hi."})
    content = {
        "bad_json": f"{good}\n\n{good}\n{{'instruction': 'single quotes'}}\n",
        "missing_field": f"{good}\n{json.dumps({'instruction': 'no response'})}\n",
        "not_utf8": None,
        "empty": "\n  \n",
        "missing_file": None,
    }[problem]
    if problem == "not_utf8":
        train_file.write_bytes(good.encode() + b"\n\xff\xfe\n")
    elif content is not None:
        train_file.write_text(content, encoding="utf-8")
    line = run_example_expecting_error(capsys, [
        str(converted_stories_dir), str(tmp_path / "out"), "--train-file", str(train_file), "--format", "instructions",
    ])
    assert str(train_file) in line
    expected = {
        "bad_json": "line 4", "missing_field": "line 2", "not_utf8": "UTF-8", "empty": "has no text",
        "missing_file": "does not exist",
    }[problem]
    assert expected in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--block-size", "0"], "--block-size 0 is not valid"),
        (["--block-size", "-5"], "--block-size -5 is not valid"),
        (["--block-size", "4096"], "--block-size 4096 is longer than the model's context"),
        (["--max-steps", "0"], "--max-steps 0 is not valid: give at least 1"),
        (["--max-steps", "-1"], "--max-steps -1 is not valid: give at least 1"),
        (["--batch-size", "0"], "--batch-size 0 is not valid: give at least 1"),
        (["--lora-r", "0"], "--lora-r 0 is not valid: give at least 1"),
        # Issue 23, item 6: these ended in tracebacks, the last one after the model had loaded.
        (["--learning-rate", "-1"], "--learning-rate -1.0 is not valid: give more than 0."),
        (["--learning-rate", "nan"], "--learning-rate nan is not valid: give more than 0."),
        (["--lora-dropout", "2"], "--lora-dropout 2.0 is not valid: give a value in [0, 1)."),
        (["--lora-alpha", "0"], "--lora-alpha 0 is not valid: give more than 0."),
        (["--target-modules", "foo_proj"], "error: --target-modules foo_proj: LoRA target_modules ['foo_proj'] "
                                           "match no module of this MoRForCausalLM."),
    ],
)
def test_example_refuses_bad_option_values(tmp_path, converted_stories_dir, capsys, options, expected):
    line = run_example_expecting_error(capsys, [
        str(converted_stories_dir), str(tmp_path / "out"), "--train-file", str(INSTRUCTIONS_PATH), "--format",
        "instructions", *options,
    ])
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_example_refuses_a_plain_llama_model_before_loading_it(tmp_path, stories_dir, capsys):
    # The older spelling, --model and --output-dir (issue 18, item 7: MODEL OUTPUT_DIR as in the other command lines),
    # still works: it is read as the positional arguments.
    line = run_example_expecting_error(capsys, [
        "--model", str(stories_dir), "--train-file", str(INSTRUCTIONS_PATH), "--format", "instructions",
        "--output-dir", str(tmp_path / "out"),
    ])
    assert f"MODEL {stories_dir} is a 'llama' model, not an MoR one" in line
    assert f"`mor-convert {stories_dir} MOR_DIR`" in line
    assert not (tmp_path / "out").exists()


def test_example_refuses_an_existing_output_dir_without_overwrite(tmp_path, converted_stories_dir, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")
    line = run_example_expecting_error(capsys, [
        str(converted_stories_dir), str(output_dir), "--train-file", str(INSTRUCTIONS_PATH), "--format",
        "instructions",
    ])
    assert f"{output_dir} already exists" in line and "--overwrite" in line
    assert [path.name for path in output_dir.iterdir()] == ["notes.txt"]


def test_example_overwrite_refuses_a_folder_holding_anything_but_an_earlier_output(
    tmp_path, converted_stories_dir, capsys
):
    """Issue 18, item 1: --overwrite never replaces a user's folder; the error lists what is there."""
    output_dir = tmp_path / "out"
    (output_dir / "sub").mkdir(parents=True)
    (output_dir / "notes.txt").write_text("keep me")
    line = run_example_expecting_error(capsys, [
        str(converted_stories_dir), str(output_dir), "--train-file", str(INSTRUCTIONS_PATH), "--format",
        "instructions", "--overwrite",
    ])
    assert "not an earlier output" in line and "notes.txt, sub/" in line
    assert sorted(path.name for path in output_dir.iterdir()) == ["notes.txt", "sub"]


def test_example_refuses_a_config_that_does_not_fit_the_weights(tmp_path, converted_stories_dir, capsys):
    """Issue 18, item 6: one error line before loading (was transformers' load report, then a RuntimeError)."""
    mismatched = edited_model_copy(converted_stories_dir, tmp_path / "mismatched",
                                   with_config_fields(intermediate_size=344))
    line = run_example_expecting_error(capsys, [
        str(mismatched), str(tmp_path / "out"), "--train-file", str(INSTRUCTIONS_PATH), "--format", "instructions",
    ])
    assert f"MODEL {mismatched}: config.json does not match the weights" in line
    assert not (tmp_path / "out").exists()


def test_example_without_peft_names_the_extra_to_install(tmp_path, converted_stories_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` fails, as after a plain `pip install -e .`
    line = run_example_expecting_error(capsys, [
        str(converted_stories_dir), str(tmp_path / "out"), "--train-file", str(INSTRUCTIONS_PATH),
    ])
    assert 'pip install "mor-transformers[peft]"' in line
    assert not (tmp_path / "out").exists()


def test_instructions_file_is_valid():
    records = [json.loads(line) for line in INSTRUCTIONS_PATH.read_text().splitlines() if line.strip()]
    assert len(records) >= 20
    assert all(set(record) == {"instruction", "response"} and record["response"] for record in records)


@pytest.fixture
def converted_stories_dir(tmp_path, stories_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conversion.convert_llama_to_mor import convert_llama_to_mor

    model_dir = tmp_path / "mor-stories260K"
    llama = LlamaForCausalLM.from_pretrained(stories_dir)
    convert_llama_to_mor(llama, num_recursions=3, sharing_strategy="middle_cycle").save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(model_dir)
    return model_dir


@pytest.mark.parametrize("data_format", ["instructions", "text"])
def test_example_fine_tunes_converted_stories260k(
    tmp_path, converted_stories_dir, tinystories_dir, data_format, capsys
):
    example = load_example_module()
    output_dir = tmp_path / "adapter"
    if data_format == "instructions":
        # An earlier run's folder (its record lists what that run wrote), replaced as a whole with --overwrite.
        output_dir.mkdir()
        (output_dir / "stale.txt").write_text("from an earlier run")
        record_output(output_dir)
        data_arguments = ["--train-file", str(INSTRUCTIONS_PATH), "--format", "instructions", "--lora-routers",
                          "--overwrite"]
    else:
        train_file, eval_file = tmp_path / "train.txt", tmp_path / "valid.txt"
        train_file.write_text((tinystories_dir / "train.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
        eval_file.write_text((tinystories_dir / "valid.txt").read_text(encoding="utf-8")[:4000], encoding="utf-8")
        data_arguments = ["--train-file", str(train_file), "--eval-file", str(eval_file), "--format", "text",
                          "--lora-routers", "full", "--block-size", "64", "--save-merged"]
    results = example.main(
        [
            str(converted_stories_dir), str(output_dir), *data_arguments,
            "--max-steps", "4", "--batch-size", "4", "--learning-rate", "5e-3", "--logging-steps", "2",
            "--sample-tokens", "8", "--prompts", "Once upon a time",
        ]
    )
    printed = capsys.readouterr().out
    assert "Samples before fine-tuning" in printed and "Samples after fine-tuning" in printed
    assert "Eval perplexity:" in printed and "'loss'" in printed  # Trainer's logging lines
    assert results["perplexity_after"] < results["perplexity_before"]
    assert (output_dir / "adapter_model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()
    assert not (output_dir / "stale.txt").exists()
    assert not list(tmp_path.glob(".adapter.incomplete-*"))  # the staging folder became OUTPUT_DIR
    reloaded = PeftModel.from_pretrained(MoRForCausalLM.from_pretrained(converted_stories_dir), output_dir).eval()
    assert lora_layers(reloaded)
    if data_format == "text":  # --save-merged: a plain MoR folder equal to base + adapter
        # Trainer turns the cache off for training; the saved model decodes with it again.
        assert json.loads((output_dir / "merged" / "config.json").read_text())["use_cache"] is True
        merged = MoRForCausalLM.from_pretrained(output_dir / "merged").eval()
        assert not lora_layers(merged)
        input_ids = torch.randint(3, merged.config.vocab_size, (1, 24))
        with torch.no_grad():
            difference = (merged(input_ids).logits - reloaded(input_ids=input_ids).logits).abs().max().item()
        # Rounding of W + scale * B A on logits of magnitude ~10 (seen: 2.4e-5); a routing flip would show as > 0.1.
        assert difference <= 1e-4


def test_lora_config_without_target_modules_uses_the_registered_default():
    """Importing modeling_mor tells PEFT the default LoRA targets of model_type "mor" (q_proj, v_proj)."""
    from peft import LoraConfig, get_peft_model

    from modeling_mor import MoRConfig, MoRForCausalLM

    config = MoRConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=5)
    peft_model = get_peft_model(MoRForCausalLM(config), LoraConfig(task_type="CAUSAL_LM"))
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
