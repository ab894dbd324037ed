"""Issue 23, item 8: the command lines choose their CPU threads for the model at hand (`cli_checks.choose_threads`):
one thread for a small model, where torch's default (one per core) was several times slower, torch's default for a
larger one, and OMP_NUM_THREADS whenever it is set."""

import pytest
import torch

from conversion.cli_checks import ONE_THREAD_MAX_HIDDEN_SIZE, choose_threads

from conftest import tiny_mor_config


@pytest.fixture
def threads(monkeypatch):
    """torch's thread count at 2 and OMP_NUM_THREADS unset (conftest sets it), restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_small_model_runs_on_one_thread(threads):
    line = choose_threads(tiny_mor_config(hidden_size=64))
    assert torch.get_num_threads() == 1
    assert line == ("Using 1 CPU thread: faster than several for a model this small (hidden size 64); set "
                    "OMP_NUM_THREADS to choose another number.")


def test_a_larger_model_keeps_torchs_default(threads):
    config = tiny_mor_config(hidden_size=ONE_THREAD_MAX_HIDDEN_SIZE + 64, num_attention_heads=8)
    line = choose_threads(config)
    assert torch.get_num_threads() == 2
    assert line == (f"Using 2 CPU thread(s), torch's default for a model of hidden size "
                    f"{ONE_THREAD_MAX_HIDDEN_SIZE + 64}; set OMP_NUM_THREADS to choose another number.")
    assert choose_threads(None).startswith("Using 2 CPU thread(s), torch's default; set OMP_NUM_THREADS")


def test_omp_num_threads_wins(threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(tiny_mor_config(hidden_size=64)) == "Using 2 CPU thread(s), as OMP_NUM_THREADS says."
    assert torch.get_num_threads() == 2
