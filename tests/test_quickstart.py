"""The README's first command, as a user runs it (shortened): corpus -> tokenizer -> .bin/.idx ->
pretraining on the shipped real corpus with validation loss falling -> checkpoint -> generated text."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_script_trains_and_generates(tmp_path):
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path / "qs"), "ITERS": "60",
           "EVAL_INTERVAL": "20", "SAVE_INTERVAL": "30"}
    proc = subprocess.run(["bash", "examples/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    valid = [float(v) for v in re.findall(r"validation at iter \d+: loss ([0-9.]+)", out)]
    assert len(valid) == 3 and valid[0] > valid[1] > valid[2], valid
    train = [float(v) for v in re.findall(r"\| loss ([0-9.]+) \|", out)]
    assert train[-1] < train[0] - 1.0, train  # clearly learning, not noise
    assert (tmp_path / "qs" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "60"
    assert (tmp_path / "qs" / "data" / "shakespeare_text_document.idx").exists()
    sample = out.split("== 5/5 sample from the checkpoint")[1].strip()
    assert sample.startswith("ROMEO.") and len(sample) > len("ROMEO.") + 20, sample
