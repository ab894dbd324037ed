"""The README's main command works on a fresh machine: no network, no ../shared (it uses what ships in examples/)."""

import os
import re
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_end_to_end_offline(tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "examples" / "quickstart.py"), "--steps", "4", "--eval-tokens", "512",
         "--output-dir", str(tmp_path / "quickstart")],
        cwd=tmp_path,  # not the project root: the script finds its assets itself
        capture_output=True, text=True, timeout=600, env=environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout
    assert "perplexity: original Llama" in output and "uptrained MoR" in output
    story = output.split("recursion depth in brackets:")[1]
    assert re.search(r"Once\[[123]\] upon\[[123]\]", story), story[:200]
    assert (tmp_path / "quickstart" / "recursion_depths.png").stat().st_size > 10_000
    assert (tmp_path / "quickstart" / "model" / "model.safetensors").exists()
    original = float(output.split("original Llama ")[1].split()[0].rstrip(","))
    assert original < 6  # the shipped checkpoint is the real pretrained model
