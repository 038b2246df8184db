"""A run killed at any moment keeps every metrics line it logged (a cluster's time limit, Ctrl-C,
out of memory)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one evaluation, then training
EVAL_FIRST_ONLY = "--eval-episodes 1 --eval-every 50000 --threads 1".split()
TINY = (
    "--updates 100000 --batch-size 8 --n-embd 16 --n-layer 1 --n-head 1".split() + EVAL_FIRST_ONLY
)
RGDT = (
    "--updates 100000 --inv-updates 5 --batch-size 8 --inv-batch-size 8 --n-embd 16".split()
    + EVAL_FIRST_ONLY
)
BC = "--updates 100000 --batch-size 8 --hidden 16".split() + EVAL_FIRST_ONLY
# What each script prints right after it logs its first evaluation (before any training step)
SCRIPTS = {
    "dt.py": (TINY, "update 0:"),
    "mo_dt.py": (TINY, "update 0:"),
    "trdt.py": (TINY, "update 0:"),
    "rgdt.py": (RGDT, "translator update 0"),
    "benchmarks/bc.py": (BC, "update 0:"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_keeps_every_logged_line(tmp_path, hdf5_path, script):
    flags, marker = SCRIPTS[script]
    where = [
        "--env",
        "hopper-random",
        "--dataset-path",
        str(hdf5_path),
        "--runs-dir",
        str(tmp_path),
    ]
    cmd = [sys.executable, script, *where]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd + flags, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    seen, deadline = [], time.time() + 120
    try:
        for line in proc.stdout:  # the evaluation has been logged when its line is printed
            seen.append(line)
            if marker in line or time.time() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)  # no chance to flush or close anything
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(marker in line for line in seen), "".join(seen)
    (run,) = tmp_path.iterdir()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("step") == 0 and "eval_normalized" in line for line in lines), lines
