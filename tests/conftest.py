import importlib
import json
import os
import shutil
import socket
from pathlib import Path


# The tests run tiny models, for which one CPU thread is faster than several (thread start-up costs more than the
# small matrix products it parallelizes) and gives the same numbers whatever else the machine runs. Set before torch
# is imported, so that subprocesses started by the tests inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_mor import MoRConfig


# The real checkpoint and text the repository ships (examples/assets/README.md), so that no test needs ../shared.
ASSETS_DIR = Path(__file__).resolve().parents[1] / "examples" / "assets"
STORIES_DIR = ASSETS_DIR / "stories260K"
TINYSTORIES_TRAIN = ASSETS_DIR / "tinystories_train_sample.txt"
TINYSTORIES_VALID = ASSETS_DIR / "tinystories_valid_sample.txt"

TINY_DIMS = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_mor_config(**overrides) -> MoRConfig:
    fields = dict(TINY_DIMS, num_hidden_layers=8, num_recursions=3, sharing_strategy="middle_cycle")
    fields.update(overrides)
    return MoRConfig(**fields)


def tiny_llama(num_hidden_layers=8, attn_implementation="eager", seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_DIMS, num_hidden_layers=num_hidden_layers)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


def mixed_routing_model(model):
    """Scales router weights so that a random-init model makes mixed routing decisions (some tokens exit at every
    step) instead of sitting at the threshold."""
    with torch.no_grad():
        for router in model.routers():
            for parameter in router.parameters():
                parameter.mul_(40.0)
    return model


def free_port() -> int:
    """A local TCP port nobody listens on (a rendezvous port, or an address that refuses connections)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def missing_setup(reason: str) -> None:
    """Skips a test (or, at import, a test module) whose setup is missing here; on CI (CI=true, which .ci/run sets and
    whose install provides every setup these tests need) fails instead, so that a broken install step cannot pass as
    a skipped test."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (.ci/run should have set it up)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_missing(module: str, reason: str):
    """`module` imported, or `missing_setup(reason)`: pytest.importorskip that fails on CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        missing_setup(reason)


def skip_without_gloo() -> None:
    """Multi-process CPU tests need torch.distributed with the gloo backend (the CPU wheels have it)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        missing_setup("this torch build has no torch.distributed gloo backend")


def last_log_history(folder) -> list[dict]:
    """Trainer's `log_history` in the newest checkpoint of a training output folder."""
    checkpoints = sorted(Path(folder).glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


def one_error_line(main, capsys, arguments) -> str:
    """Runs a command-line `main` that must refuse `arguments` with exit status 2 and one `error:` line on stderr;
    returns that line."""
    capsys.readouterr()
    assert main([str(argument) for argument in arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


def edited_model_copy(folder, destination, edit) -> Path:
    """A copy of the model folder `folder` whose config.json is changed by `edit(text) -> text`: a truncated one, or
    one edited by hand so that it no longer fits the weights (see `with_config_fields`)."""
    copy = Path(shutil.copytree(folder, destination))
    config = copy / "config.json"
    config.write_text(edit(config.read_text()))
    return copy


def with_config_fields(**fields):
    """An `edit` for `edited_model_copy` that sets config.json fields."""
    return lambda text: json.dumps({**json.loads(text), **fields})


@pytest.fixture
def stories_dir():
    """The real pretrained stories260K Llama (5 layers, vocabulary 512) with its tokenizer."""
    return STORIES_DIR


@pytest.fixture(scope="session")
def tinystories_dir(tmp_path_factory):
    """A folder with `train.txt` and `valid.txt`: copies of the TinyStories samples the repository ships."""
    folder = tmp_path_factory.mktemp("tinystories")
    shutil.copyfile(TINYSTORIES_TRAIN, folder / "train.txt")
    shutil.copyfile(TINYSTORIES_VALID, folder / "valid.txt")
    return folder


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
