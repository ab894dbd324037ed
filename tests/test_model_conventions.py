"""The usual expectations transformers' common model tests hold every model to (tests/test_modeling_common.py there),
for MoR: weight initialization, loading reports, embedding resizing and tying, parameter counts, dtypes, and eager
attention agreeing with sdpa on padded batches."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_mor import MoRForCausalLM, MoRModel

from conftest import TINY_DIMS, mixed_routing_model, tiny_mor_config


# Configurations between them holding every kind of parameter and buffer MoR adds to Llama: per-step routers, auxiliary
# routers (with a bias), MLP routers, the token-choice `selection_bias` buffer, relaxation deltas (with biases).
INIT_CONFIGS = {
    "expert_choice_auxiliary_relaxed": dict(router_inference="auxiliary", relaxation_rank=2, attention_bias=True),
    "token_choice_loss_free_mlp_router": dict(routing="token_choice", balancing="loss_free", router_type="mlp"),
    # Every projection's delta of full rank, stored whole (relaxation_delta).
    "expert_choice_full_rank_relaxed": dict(relaxation_rank=32, attention_bias=True),
}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("name", list(INIT_CONFIGS))
def test_init_weights_initialises_every_parameter_and_buffer(name):
    """transformers' test_init_weights_can_init_buffers / test_initialization: a model built on the meta device and
    materialized with garbage gets every tensor from `_init_weights`; with a ~zero initializer_range every parameter
    is then 0 or 1 on average, and buffers equal those of a model built normally."""
    config = tiny_mor_config(**INIT_CONFIGS[name], initializer_range=1e-10)
    with torch.device("meta"):
        model = MoRForCausalLM(copy.deepcopy(config))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in _tensors(model).values():
            tensor.fill_(float("nan"))  # what `_init_weights` leaves untouched stays visible
    model.init_weights()

    untouched = [key for key, tensor in _tensors(model).items() if not torch.isfinite(tensor).all()]
    assert untouched == [], f"not initialized by _init_weights: {untouched}"
    for key, parameter in model.named_parameters():
        mean = ((parameter.mean() * 1e9).round() / 1e9).item()
        assert mean in (0.0, 1.0), f"{key} is not initialized from config.initializer_range (mean {mean})"
    reference = MoRForCausalLM(copy.deepcopy(config))
    for key, buffer in reference.named_buffers():
        assert torch.equal(dict(model.named_buffers())[key], buffer), key
    # Every tensor is registered (a plain tensor attribute would still be on the meta device): a forward runs.
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randint(0, config.vocab_size, (2, 7))).logits).all()


@pytest.mark.parametrize("name", list(INIT_CONFIGS))
def test_initialization_follows_initializer_range(name):
    config = tiny_mor_config(**INIT_CONFIGS[name])
    model = MoRForCausalLM(config)
    std = config.initializer_range
    for key, parameter in model.named_parameters():
        if key.endswith(("relaxation_B", "relaxation_bias", "relaxation_weight", "relaxation_delta", ".bias")):
            assert torch.all(parameter == 0), key  # deltas start at zero: the relaxed model starts as the shared one
        elif "norm" in key:
            assert torch.all(parameter == 1), key
        else:  # projections, embeddings, routers, relaxation_A: normal(0, initializer_range)
            assert 0.5 * std < parameter.std().item() < 1.5 * std, (key, parameter.std().item())
            assert parameter.abs().max().item() < 7 * std, key


def _save_with_edited_weights(model, folder, drop=(), add=None):
    model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    for key in drop:
        del weights[key]
    weights.update(add or {})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_from_pretrained_reports_missing_and_unexpected_keys(tmp_path):
    """`output_loading_info=True` lists them, the load report logs them, the missing ones are initialized, and every
    loaded tensor keeps its value, including the other parameters of a module with a missing one."""
    config = tiny_mor_config(relaxation_rank=2, routing="token_choice", balancing="loss_free")
    model = MoRForCausalLM(config)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "relaxation" in key:
                parameter.normal_(std=0.3)  # trained deltas: not what `_init_weights` would give
        model.model.recursion_block.routing.selection_bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    missing = {
        "model.recursion_block.layers.0.self_attn.q_proj.relaxation_A",
        "model.recursion_block.layers.1.post_attention_layernorm.weight",
    }
    unexpected = {"model.recursion_block.unused_adapter.weight"}
    _save_with_edited_weights(model, tmp_path, drop=missing, add={key: torch.zeros(3) for key in unexpected})

    logger = logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(logger) as captured:
        loaded, loading_info = MoRForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert set(loading_info["missing_keys"]) == missing
    assert set(loading_info["unexpected_keys"]) == unexpected
    assert loading_info["mismatched_keys"] == set() and loading_info["error_msgs"] == []
    for key in missing | unexpected:
        assert key in captured.out

    saved = model.state_dict()
    overwritten = [
        key for key, tensor in loaded.state_dict().items() if key not in missing and not torch.equal(tensor, saved[key])
    ]
    assert overwritten == [], f"loaded tensors overwritten by _init_weights: {overwritten}"
    relaxation_A = loaded.model.recursion_block.layers[0].self_attn.q_proj.relaxation_A
    assert torch.isfinite(relaxation_A).all() and 0 < relaxation_A.std() < 3 * config.initializer_range
    assert torch.all(loaded.model.recursion_block.layers[1].post_attention_layernorm.weight == 1)


@pytest.mark.parametrize("new_vocab_size", [110, 80])
def test_resize_token_embeddings_keeps_the_head_tied(new_vocab_size, tmp_path):
    config = tiny_mor_config(tie_word_embeddings=True)
    model = MoRForCausalLM(config)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    embeddings = model.resize_token_embeddings(new_vocab_size)

    assert embeddings is model.get_input_embeddings()
    assert embeddings.weight.shape == (new_vocab_size, config.hidden_size)
    assert model.config.vocab_size == new_vocab_size
    assert model.get_output_embeddings().weight is embeddings.weight
    kept = min(new_vocab_size, TINY_DIMS["vocab_size"])
    assert torch.equal(embeddings.weight[:kept], old_embeddings[:kept])
    input_ids = torch.randint(0, new_vocab_size, (2, 9))
    outputs = model(input_ids, labels=input_ids)
    assert outputs.logits.shape == (2, 9, new_vocab_size) and torch.isfinite(outputs.loss)

    model.save_pretrained(tmp_path)
    reloaded = MoRForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.vocab_size == new_vocab_size
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model.eval()(input_ids).logits)


def test_resize_token_embeddings_of_an_untied_model_resizes_both():
    model = MoRForCausalLM(tiny_mor_config(tie_word_embeddings=False))
    model.resize_token_embeddings(110)
    assert model.lm_head.weight.shape == model.model.embed_tokens.weight.shape == (110, TINY_DIMS["hidden_size"])
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_tie_word_embeddings_false_gives_an_independent_head(tmp_path):
    model = MoRForCausalLM(tiny_mor_config(tie_word_embeddings=False)).eval()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    reloaded = MoRForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    with torch.no_grad():
        reloaded.model.embed_tokens.weight.zero_()
    assert reloaded.lm_head.weight.abs().sum() > 0

    tied = MoRForCausalLM(tiny_mor_config(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    tied.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")


def test_get_and_set_input_and_output_embeddings():
    model = MoRForCausalLM(tiny_mor_config(tie_word_embeddings=True))
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    new_embeddings = nn.Embedding(TINY_DIMS["vocab_size"], TINY_DIMS["hidden_size"])
    model.set_input_embeddings(new_embeddings)
    assert model.get_input_embeddings() is new_embeddings and model.model.embed_tokens is new_embeddings
    model.tie_weights()
    assert model.lm_head.weight is new_embeddings.weight
    input_ids = torch.randint(0, TINY_DIMS["vocab_size"], (1, 5))
    with torch.no_grad():
        hidden_states = model.model(input_ids).last_hidden_state
        torch.testing.assert_close(model(input_ids).logits, hidden_states @ new_embeddings.weight.T)

    base = MoRModel(tiny_mor_config())
    replacement = nn.Embedding(TINY_DIMS["vocab_size"], TINY_DIMS["hidden_size"])
    base.set_input_embeddings(replacement)
    assert base.get_input_embeddings() is replacement


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_num_parameters_excluding_embeddings_is_the_hand_count(tie_word_embeddings):
    config = tiny_mor_config(tie_word_embeddings=tie_word_embeddings)  # middle_cycle: 2 end layers + 2 shared layers
    hidden, intermediate, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv_width = config.num_key_value_heads * hidden // config.num_attention_heads
    attention = hidden * hidden * 2 + hidden * kv_width * 2  # q, o; k, v
    mlp = 3 * hidden * intermediate
    layer = attention + mlp + 2 * hidden  # + the two RMSNorms
    routers = config.num_recursions * hidden  # one linear scorer per step, one output, no bias
    head = 0 if tie_word_embeddings else vocab * hidden  # a tied head is the embedding matrix
    expected = config.num_unique_layers * layer + hidden + routers + head
    model = MoRForCausalLM(config)
    assert config.num_unique_layers == 4
    assert model.num_parameters(exclude_embeddings=True) == expected
    assert model.num_parameters() == expected + vocab * hidden


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_forward_and_generate(dtype, tmp_path):
    torch.manual_seed(0)
    model = mixed_routing_model(MoRForCausalLM(tiny_mor_config())).eval()
    input_ids = torch.randint(0, TINY_DIMS["vocab_size"], (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        reference = model(input_ids, attention_mask=attention_mask).logits

    model.to(dtype)
    assert model.dtype == dtype and all(parameter.dtype == dtype for parameter in model.parameters())
    assert MoRForCausalLM.from_pretrained(tmp_path, dtype=dtype).dtype == dtype
    with torch.no_grad():
        outputs = model(input_ids, attention_mask=attention_mask, output_recursion_depth=True)
        generated = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False)
    assert outputs.logits.dtype == dtype and torch.isfinite(outputs.logits).all()
    assert generated.shape == (2, 13)
    # Routing is discrete, so a token whose router logit sits within rounding of the threshold may take another
    # depth than in float32; most tokens' logits stay within half precision of float32.
    real = attention_mask.bool()
    close = torch.isclose(outputs.logits.float(), reference, atol=5e-2, rtol=5e-2).all(-1)[real]
    assert close.float().mean() >= 0.8


# transformers' tolerances for eager vs sdpa on CPU (tests/test_modeling_common.py, _test_eager_matches_sdpa_inference).
EAGER_SDPA_TOLERANCES = {torch.float32: (1e-6, 1e-4), torch.bfloat16: (1e-2, 1e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_matches_sdpa_on_a_left_padded_batch(dtype, tmp_path):
    """As transformers tests it: a batch of 7 whose last rows are left-padded, the last hidden states compared on the
    real tokens, each row with the dtype's tolerance (bf16: also 3% of the outputs' magnitude), at least 80% of the
    rows within it. Expert-choice routing, made to stop tokens at every step."""
    torch.manual_seed(0)
    mixed_routing_model(MoRForCausalLM(tiny_mor_config(routing="expert_choice"))).save_pretrained(tmp_path)
    sdpa = MoRForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation="sdpa").eval()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")

    input_ids = torch.randint(0, TINY_DIMS["vocab_size"], (7, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, :2] = 0
    attention_mask[-2, :5] = 0
    with torch.no_grad():
        outputs = {
            name: model.model(input_ids, attention_mask=attention_mask, use_cache=False)
            for name, model in (("eager", eager), ("sdpa", sdpa))
        }
    real = attention_mask.bool()
    depth = {name: output.recursion_depth for name, output in outputs.items()}
    assert 0 < depth["eager"][real].float().mean() < tiny_mor_config().num_recursions  # routing is mixed
    hidden = {name: output.last_hidden_state.masked_fill(~real.unsqueeze(-1), 0) for name, output in outputs.items()}

    atol, rtol = EAGER_SDPA_TOLERANCES[dtype]
    if dtype == torch.bfloat16:
        magnitude = max(state.abs().max().item() for state in hidden.values())
        atol = max(atol, 3e-2 * magnitude)
    rows_close = [torch.allclose(e, s, atol=atol, rtol=rtol) for e, s in zip(hidden["eager"], hidden["sdpa"])]
    assert np.mean(rows_close) >= 0.8, rows_close
    if dtype == torch.float32:
        # In float32 nothing is near a routing threshold: the same tokens take the same steps, every row agrees.
        assert torch.equal(depth["eager"], depth["sdpa"]) and all(rows_close)
    else:
        assert (depth["eager"] == depth["sdpa"])[real].float().mean() >= 0.95
