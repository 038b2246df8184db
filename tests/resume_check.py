"""Shared checks of exact resume (issue "Runs that survive"), used by each method file's resume
tests: a run stopped by a real signal half way and continued with --resume must equal the run that
was never stopped, bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def signal_on_call(module, monkeypatch, name: str, n: int, sig=signal.SIGTERM) -> None:
    """Send `sig` to this process during the n-th call of module.<name> (an update): the run must
    finish that call, save, and stop, exactly as when a cluster sends the signal from outside."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), sig)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)


def run_dir_of(runs: Path) -> Path:
    (run,) = [p for p in Path(runs).iterdir() if p.is_dir()]
    return run


def lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_timing(line: dict) -> dict:
    """Everything a metrics line says about the run, not about the machine's speed."""
    return {k: v for k, v in line.items() if not k.endswith("_per_s") and not k.endswith("time_s")}


def assert_same_run(stopped: dict, whole: dict, weight_keys=("model",)) -> None:
    """The resumed run's metrics, scores and final weights equal those of the uninterrupted one."""
    a, b = Path(stopped["run_dir"]), Path(whole["run_dir"])
    assert [without_timing(x) for x in lines(a)] == [without_timing(x) for x in lines(b)]
    steps = [
        (x["step"], "eval" if any(k.startswith("eval_") for k in x) else "train") for x in lines(a)
    ]
    assert len(steps) == len(set(steps)), "a step was written twice"
    assert (
        stopped["returns"] == whole["returns"]
        and stopped["trained_updates"] == whole["trained_updates"]
    )
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    for key in weight_keys:
        assert wa[key].keys() == wb[key].keys()
        for name in wa[key]:
            assert torch.equal(wa[key][name], wb[key][name]), (
                f"{key}.{name} differs after the resume"
            )


def signal_after(cmd, marker: str, log_path, sig, settle_s: float = 2.0, timeout_s: float = 180.0):
    """Run a script as a user would, send `sig` `settle_s` seconds after `marker` appears in its
    output, wait for it to exit; returns (exit code, output)."""
    with open(log_path, "w") as log:
        default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                preexec_fn=default_sigint)  # fmt: skip
        try:
            deadline = time.time() + timeout_s
            while marker not in Path(log_path).read_text():
                assert proc.poll() is None and time.time() < deadline, Path(log_path).read_text()
                time.sleep(0.1)
            time.sleep(settle_s)
            proc.send_signal(sig)
            proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, Path(log_path).read_text()


SLOW_SAVE = """
import os, sys, time
import torch
sys.path.insert(0, {root!r})
real, calls = torch.save, [0]

def slow_save(obj, f):  # the n-th save writes half a file and hangs: the test kills it there
    calls[0] += 1
    if calls[0] == {n}:
        f.write(b"half a checkpoint")
        f.flush()
        print("SAVING", flush=True)
        time.sleep(600)
    real(obj, f)

torch.save = slow_save
import tyro
import {module} as m
sys.argv = [{module!r} + ".py"] + {argv!r}
m.train(tyro.cli(m.Args))
"""


def kill_during_save(module: str, argv: list, tmp_path: Path, n: int = 2) -> Path:
    """Run `module` with the n-th checkpoint save slowed down, SIGKILL it in the middle of that
    save, and return the run folder it left."""
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE.format(root=str(ROOT), n=n, module=module, argv=argv))
    log = tmp_path / "slow_save.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(script)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.time() + 180
            while "SAVING" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.1)
            proc.kill()  # SIGKILL: no handler runs
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return run_dir_of(Path(argv[argv.index("--runs-dir") + 1]))


needs_sigusr1 = pytest.mark.skipif(
    not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform"
)
