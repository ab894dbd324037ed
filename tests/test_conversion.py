"""The conversion pipeline: CLI, model card, bad input, interrupted runs, Hub push, uptraining."""

import copy
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conversion.convert_llama_to_mor import main as convert_main
from hub_server import DEFAULT_TOKEN, hub_environment, run_hub_client, running_hub_server
from test_save_load import run_isolated


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env,
    )


ASSETS = PROJECT_ROOT / "examples" / "assets"
STORIES = ASSETS / "stories260K"  # the real pretrained checkpoint the repository ships
VALID_TEXT = ASSETS / "tinystories_valid_sample.txt"


@pytest.fixture(scope="module")
def converted_stories(tmp_path_factory, request):
    """stories260K converted by the CLI (middle_cycle, N_r = 3), with an evaluation text."""
    output = tmp_path_factory.mktemp("cli") / "stories-mor"
    code = convert_main([
        str(STORIES), str(output), "--num-recursions", "3", "--sharing-strategy", "middle_cycle",
        "--eval-file", str(VALID_TEXT), "--eval-max-tokens", "2048",
    ])
    assert code == 0
    return output


def test_cli_writes_a_complete_folder_that_loads_in_a_fresh_process(converted_stories, tmp_path):
    names = {path.name for path in converted_stories.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "modeling_mor.py", "configuration_mor.py", "cache_mor.py", "routing_mor.py", "relaxation_mor.py"} <= names
    config = json.loads((converted_stories / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mor.MoRForCausalLM"
    assert config["num_recursions"] == 3 and config["sharing_strategy"] == "middle_cycle"
    assert not any(p.name.startswith(".") for p in converted_stories.parent.iterdir()), "staging folder left behind"

    from transformers import AutoModelForCausalLM

    expected_model = AutoModelForCausalLM.from_pretrained(converted_stories).eval()
    input_ids = torch.randint(0, 512, (1, 16))
    torch.save(input_ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = expected_model(input_ids).logits
    run_isolated(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(converted_stories)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(converted_stories)!r})
        assert tokenizer("Once upon a time").input_ids
        with torch.no_grad():
            torch.save(model(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
        """,
        cwd=tmp_path,
    )
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max().item() <= 1e-6


def test_model_card_is_filled_with_the_real_figures(converted_stories):
    card = (converted_stories / "README.md").read_text()
    figures = json.loads((converted_stories / "mor_card.json").read_text())
    assert "${" not in card and "None" not in card
    assert card.startswith("---\nlicense: mit\n")  # read from the shipped model's own card (issue 18, item 7)
    assert "| unique decoder layers | 5 | 3 |" in card
    assert f"| parameters | {figures['source_parameters']} | {figures['mor_parameters']} |" in card
    for label, value in figures["perplexity"].items():
        assert f"| {label} | {value:.2f} |" in card
    assert figures["perplexity"][next(iter(figures["perplexity"]))] < 10  # the real source model
    assert "## Recursion depth per token" in card and "| depth | tokens | share |" in card
    assert "trust_remote_code=True" in card


def _llama_folder(path, num_layers=5, model_type_override=None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=num_layers, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    assert convert_main([str(gpt2), str(tmp_path / "out1")]) == 2
    error = capsys.readouterr().err
    assert "'gpt2' checkpoint" in error and "Llama-architecture" in error and "SmolLM" in error

    llama = _llama_folder(tmp_path / "llama6", num_layers=6)
    assert convert_main([str(llama), str(tmp_path / "out2"), "--sharing-strategy", "cycle", "--num-recursions", "4"]) == 2
    error = capsys.readouterr().err
    assert "6 layers" in error and "--sharing-strategy cycle --num-recursions 3" in error
    assert "--sharing-strategy middle_cycle --num-recursions 2" in error

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    assert convert_main([str(llama), str(existing), "--num-recursions", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()

    # --overwrite replaces an earlier output of the converter only (tests/test_conversion_errors.py, issue 18).
    assert convert_main([str(llama), str(existing), "--num-recursions", "2", "--overwrite"]) == 2
    assert "keep.txt" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("kill_signal", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_conversion_leaves_no_partial_folder(tmp_path, kill_signal, stories_dir, tinystories_dir):
    workdir = tmp_path / "work"
    workdir.mkdir()
    output = workdir / "interrupted"
    # A long evaluation keeps the conversion busy long enough to be killed mid-way: the shipped sample repeated (on
    # its own it is evaluated in well under the second this test waits on a fast machine).
    eval_file = tmp_path / "long_eval.txt"
    eval_file.write_text((tinystories_dir / "train.txt").read_text(encoding="utf-8") * 20, encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "conversion.convert_llama_to_mor", str(stories_dir), str(output),
         "--eval-file", str(eval_file), "--eval-max-tokens", "4000000"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # Ctrl-C's default action: a shell that starts the test suite in the background hands its children SIGINT
        # ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not list(workdir.glob(".interrupted.incomplete-*")):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    process.send_signal(kill_signal)
    output, _ = process.communicate(timeout=60)
    # Issue 18, item 6: one line and the shell's status for the signal (130 for Ctrl-C), no traceback.
    assert process.returncode == 128 + kill_signal, output[-3000:]
    how = "Ctrl-C" if kill_signal == signal.SIGINT else "SIGTERM"
    assert output.strip().splitlines()[-1] == f"error: interrupted by {how}; nothing was written.", output[-3000:]
    assert "Traceback" not in output
    assert list(workdir.iterdir()) == []


def test_a_staging_folder_left_by_sigkill_is_cleaned_by_the_next_run(tmp_path):
    llama = _llama_folder(tmp_path / "llama")
    stale = tmp_path / ".out.incomplete-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half written")
    assert convert_main([str(llama), str(tmp_path / "out"), "--num-recursions", "3", "--no-tokenizer"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out"]


@pytest.mark.parametrize("routing, router_type", [("none", "linear"), ("expert_choice", "linear"), ("expert_choice", "mlp")])
def test_full_rank_relaxation_from_the_cli_reproduces_the_source(routing, router_type, tmp_path):
    """The compute route of the conversion recipe starts from the source itself: with --relaxation-rank full the
    converted model's logits are the source's, without routing and under expert-choice routing (a fresh conversion's
    routers send every token to full depth), whatever the capacities it will train for."""
    from transformers import AutoModelForCausalLM

    llama_dir = _llama_folder(tmp_path / "llama")
    assert convert_main([str(llama_dir), str(tmp_path / "relaxed"), "--num-recursions", "3", "--routing", routing,
                         "--router-type", router_type, "--relaxation-rank", "full", "--no-tokenizer",
                         *(["--capacity", "1.0", "0.5", "0.3"] if routing != "none" else [])]) == 0
    source = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    relaxed = AutoModelForCausalLM.from_pretrained(tmp_path / "relaxed").eval()
    input_ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        output = relaxed(input_ids, output_recursion_depth=True)
        assert (output.logits - source(input_ids).logits).abs().max().item() <= 1e-4
    assert output.recursion_depth.eq(3).all()
    assert relaxed.config.router_type == router_type
    # The projections store merged per-step weights: as many parameters as the source's (the norms, a vector each,
    # keep a shared weight and a delta per step).
    def projection_parameters(model):
        return sum(parameter.numel() for name, parameter in model.named_parameters() if "_proj." in name)
    assert projection_parameters(relaxed) == projection_parameters(source)


def test_defaults_choose_the_layout_and_keep_the_source_exact(tmp_path, capsys):
    """mor-convert's defaults, the knee of the conversion recipe: --num-recursions auto picks the smallest N_r the
    layer count allows, and --relaxation-rank full keeps every layer exact (the source's logits)."""
    from transformers import AutoModelForCausalLM

    from conversion.convert_llama_to_mor import default_num_recursions

    # SmolLM2-135M (30 layers), stories260K (5: 3 middle layers), 33 layers (31 middle: prime), and layout-less ones.
    assert [default_num_recursions(layers, "middle_cycle") for layers in (30, 5, 33, 10)] == [2, 3, 31, 2]
    assert default_num_recursions(27, "cycle") == 3 and default_num_recursions(3, "middle_cycle") is None
    llama_dir = _llama_folder(tmp_path / "llama", num_layers=10)
    assert convert_main([str(llama_dir), str(tmp_path / "mor"), "--no-tokenizer"]) == 0
    assert "--num-recursions auto: 2 (the smallest the source's 10 layers allow" in capsys.readouterr().out
    config = json.loads((tmp_path / "mor" / "config.json").read_text())
    assert (config["num_recursions"], config["relaxation_rank"], config["routing"]) == (2, 16, "expert_choice")
    source = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "mor").eval()
    input_ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert (converted(input_ids).logits - source(input_ids).logits).abs().max().item() <= 1e-4
    # A source with no layout of the strategy names the valid ones.
    assert convert_main([str(_llama_folder(tmp_path / "tiny", num_layers=3)), str(tmp_path / "no"), "--no-tokenizer"]) == 2
    assert "--num-recursions auto: the source's 3 layers have no --sharing-strategy middle_cycle layout" in (
        capsys.readouterr().err)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("num_recursions", [2, 3])
def test_search_init_takes_the_tied_layers_with_the_lowest_perplexity(tmp_path, capsys, num_recursions):
    """--init-strategy search (for real sharing, rank 0): each shared layer starts from one of the source layers at
    the positions it serves, the one the tied model scores best with on the calibration text. The reference is the
    source's own layers tied by hand (a LlamaForCausalLM whose positions in one tied group hold the same layer, which
    is what a rank-0 MoR computes at full depth), every combination scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conversion.measure import perplexity_and_depths, read_eval_tokens

    # 8 layers: middle_cycle gives 3 shared layers x 2 steps, or 2 shared layers x 3 steps. Weights large enough that
    # the layers differ materially; stories260K's tokenizer reads the calibration text.
    torch.manual_seed(0)
    llama_dir = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=8, max_position_embeddings=64, initializer_range=0.3,
                                 tie_word_embeddings=True)).save_pretrained(llama_dir)
    for path in STORIES.glob("tokenizer*"):
        shutil.copy(path, llama_dir)
    source = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    block = 6 // num_recursions
    groups = [[1 + k + block * step for step in range(num_recursions)] for k in range(block)]
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(VALID_TEXT.read_text()[:3000])
    token_ids = read_eval_tokens(AutoTokenizer.from_pretrained(llama_dir), calibration, 2048)

    def tied_perplexity(choice):
        tied = copy.deepcopy(source)
        for group, position in zip(groups, choice):
            for index in group:
                tied.model.layers[index].load_state_dict(source.model.layers[group[position]].state_dict())
        return perplexity_and_depths(tied, token_ids)[0]

    every = {choice: tied_perplexity(choice) for choice in itertools.product(range(num_recursions), repeat=block)}
    assert max(every.values()) > 1.01 * min(every.values()), "the choices must differ for the test to mean anything"
    assert convert_main([str(llama_dir), str(tmp_path / "mor"), "--num-recursions", str(num_recursions),
                         "--relaxation-rank", "0", "--init-strategy", "search", "--calibration-file",
                         str(calibration)]) == 0
    report = capsys.readouterr().out
    mor = AutoModelForCausalLM.from_pretrained(tmp_path / "mor").eval()
    choice = []
    for layer, group in zip(mor.model.unrolled_layers()[1 : 1 + block], groups):
        matches = [position for position, index in enumerate(group)
                   if torch.equal(layer.mlp.down_proj.weight, source.model.layers[index].mlp.down_proj.weight)]
        assert len(matches) == 1, "each shared layer starts as one of the source layers it stands for"
        choice.append(matches[0])
    choice = tuple(choice)
    # A coordinate descent: no single shared layer's other choice is better, and (on this model) it went beyond the
    # uniform choices it starts from.
    for layer in range(block):
        for position in range(num_recursions):
            assert every[choice] <= every[choice[:layer] + (position,) + choice[layer + 1:]]
    assert every[choice] < min(every[(position,) * block] for position in range(num_recursions))
    with torch.no_grad():
        assert math.isclose(perplexity_and_depths(mor, token_ids)[0], every[choice], rel_tol=1e-4)
    chosen = ", ".join(str(group[position]) for group, position in zip(groups, choice))
    assert f"Init search: the shared layers start from source layers {chosen}" in report
    card = (tmp_path / "mor" / "README.md").read_text()
    assert f"initialization `search`; the shared layers start from source layers {chosen}" in card


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_unrolled_layer_forward_is_the_source_layer(tmp_path, attn_implementation):
    """`MoRModel.unrolled_layer_forward({p: h})` (what block-wise training calls) is the source's layer p: fed the
    source's hidden states before layer p, a full-rank conversion returns the source's hidden states after it, at every
    position whose output is not the final (normalized) one, under both attention paths (eager builds its causal
    mask)."""
    from transformers import AutoModelForCausalLM

    llama_dir = _llama_folder(tmp_path / "llama", num_layers=6)
    assert convert_main([str(llama_dir), str(tmp_path / "mor"), "--no-tokenizer", "--num-recursions", "2"]) == 0
    source = LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation=attn_implementation).eval()
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "mor", attn_implementation=attn_implementation).eval()
    input_ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        states = source(input_ids, output_hidden_states=True).hidden_states
        outputs = converted.model.unrolled_layer_forward({position: states[position] for position in range(5)})
        for position in range(5):
            assert (outputs[position] - states[position + 1]).abs().max().item() <= 1e-5, position
        # A different input gives a different output (the comparison above is not vacuous).
        assert (converted.model.unrolled_layer_forward({2: states[1]})[2] - states[3]).abs().max().item() > 1e-3


def test_push_to_hub_round_trip(converted_stories, tmp_path):
    with running_hub_server(tmp_path / "hub") as url:
        env = hub_environment(url, DEFAULT_TOKEN, tmp_path / "home")
        pushed = run_module("conversion.push_to_hub", converted_stories, "test-user/stories-mor", "--private",
                            "--commit-message", "first upload", env=env)
        assert pushed.returncode == 0, pushed.stderr
        output = run_hub_client(
            f"""
            import torch
            from huggingface_hub import HfApi
            from transformers import AutoModelForCausalLM, AutoTokenizer
            files = set(HfApi().list_repo_files("test-user/stories-mor"))
            assert {{"README.md", "modeling_mor.py", "routing_mor.py", "cache_mor.py", "tokenizer.json",
                     "model.safetensors", "config.json"}} <= files, files
            assert HfApi().list_repo_commits("test-user/stories-mor")[0].title == "first upload"
            model = AutoModelForCausalLM.from_pretrained("test-user/stories-mor", trust_remote_code=True).eval()
            tokenizer = AutoTokenizer.from_pretrained("test-user/stories-mor")
            ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
            with torch.no_grad():
                torch.save(model(ids).logits, {str(tmp_path / 'hub_logits.pt')!r})
            torch.save(ids, {str(tmp_path / 'hub_ids.pt')!r})
            """,
            env={**env, **{"PYTHONPATH": ""}},
            cwd=tmp_path,
        )
        anonymous = run_module("conversion.push_to_hub", converted_stories, "test-user/other",
                               env=hub_environment(url, "hf_wrong_token", tmp_path / "home2"))
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(converted_stories).eval()
    with torch.no_grad():
        expected = local(torch.load(tmp_path / "hub_ids.pt")).logits
    assert (torch.load(tmp_path / "hub_logits.pt") - expected).abs().max().item() <= 1e-6
    # A failed push says why and leaves the local folder as it was.
    assert anonymous.returncode == 1
    assert "failed" in anonymous.stderr and "local folder is intact" in anonymous.stderr
    assert (converted_stories / "model.safetensors").exists()


def test_cli_push_failure_keeps_the_converted_folder(tmp_path):
    llama_dir = _llama_folder(tmp_path / "llama")
    with running_hub_server(tmp_path / "hub") as url:
        env = hub_environment(url, "hf_wrong_token", tmp_path / "home")
        result = run_module("conversion.convert_llama_to_mor", llama_dir, tmp_path / "out", "--num-recursions", "3",
                            "--push-to-hub", "someone/model", "--no-tokenizer", env=env)
    assert result.returncode == 1
    assert "pushing" in result.stderr and "local folder is intact" in result.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_quantized_source_leaves_no_quantization_config(tmp_path):
    """A GGUF source is dequantized on load: the converted model is plain weights, saveable and trainable."""
    from transformers import AutoModelForCausalLM

    from conversion import convert_llama_to_mor

    llama = LlamaForCausalLM.from_pretrained(_llama_folder(tmp_path / "llama"))
    llama.config.quantization_config = {"quant_method": "gguf"}  # what transformers' GGUF loading leaves
    mor = convert_llama_to_mor(llama, num_recursions=3, sharing_strategy="middle_cycle")
    assert getattr(mor.config, "quantization_config", None) is None
    mor.save_pretrained(tmp_path / "mor")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mor")
    assert not getattr(reloaded, "is_quantized", False)
    reloaded.save_pretrained(tmp_path / "again")


def test_output_folder_gets_normal_permissions(tmp_path):
    llama_dir = _llama_folder(tmp_path / "llama")
    assert convert_main([str(llama_dir), str(tmp_path / "out"), "--num-recursions", "3", "--no-tokenizer"]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_full_rank_projection_runs_each_steps_target_whatever_order_it_is_set_in(dtype):
    """A full-rank relaxed projection stores its per-step weights merged (the first step's as the shared weight, the
    later steps' as differences): setting the first step's last must keep the others' weights."""
    from modeling_mor.relaxation_mor import RelaxedLinear

    torch.manual_seed(0)
    projection = RelaxedLinear(8, 6, bias=True, num_steps=3, rank=8).to(dtype)
    assert projection.is_dense and projection.relaxation_delta.shape == (2, 6, 8)
    targets, biases = torch.randn(3, 6, 8), torch.randn(3, 6)
    for step in (2, 1, 0):
        projection.init_from_target(step, targets[step], biases[step])
    inputs = torch.randn(4, 8)
    for step in range(3):
        expected = torch.nn.functional.linear(inputs, targets[step], biases[step])
        tolerance = 1e-5 if dtype == torch.float32 else 0.1  # bfloat16 rounds each difference once more
        assert (projection(inputs.to(dtype), step).float() - expected).abs().max().item() <= tolerance, step
    assert torch.equal(projection.step_weight(0), targets[0].to(dtype))  # the first step's weight is exact
