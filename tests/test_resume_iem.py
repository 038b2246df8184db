"""iem.py survives its interruptions: exact resume, atomic checkpoints, SIGTERM and SIGUSR1 (issue
24)."""

import json
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_check import (
    kill_during_save,
    lines,
    needs_sigusr1,
    run_dir_of,
    signal_after,
    signal_on_call,
    without_timing,
)

import iem

LEVEL = "GoToLocalS7N5"
N_DEMOS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The bot's demos, collected once into the cache every run of this file reads."""
    d = tmp_path_factory.mktemp("babyai")
    iem.collect_demos(LEVEL, N_DEMOS, d / f"{iem.env_id(LEVEL)}__bot{N_DEMOS}.npz")
    return d


def tiny(runs, data_dir, **kw):
    base = dict(env=LEVEL, collect=N_DEMOS, data_dir=str(data_dir), runs_dir=str(runs),
                updates=8, batch_size=8, n_layer=2, n_head=2, n_embd=16, horizon=3, iterations=3,
                eval_episodes=3, log_every=3)  # fmt: skip
    return iem.Args(**{**base, **kw})


def argv(runs, data_dir, *more) -> list:
    """The same tiny run on the command line."""
    return ["--env", LEVEL, "--collect", str(N_DEMOS), "--data-dir", str(data_dir),
            "--runs-dir", str(runs), "--batch-size", "4", "--n-embd", "16", "--n-layer", "1",
            "--n-head", "2", "--horizon", "3", "--iterations", "2", "--eval-episodes", "1",
            "--threads", "1", *more]  # fmt: skip


def assert_same_iem_run(resumed: dict, whole: dict) -> None:
    """The resumed run's metrics, episodes, energies and final weights equal the uninterrupted
    run's."""
    a, b = Path(resumed["run_dir"]), Path(whole["run_dir"])
    assert [without_timing(x) for x in lines(a)] == [without_timing(x) for x in lines(b)]
    steps = [(x["step"], "loss" in x) for x in lines(a)]
    assert len(steps) == len(set(steps)), "a step was written twice"
    for k in ("iem", "bc"):
        for field in ("returns", "lengths", "energy_per_iteration"):
            assert resumed[k][field] == whole[k][field], f"{k} {field} differ after the resume"
    assert resumed["trained_updates"] == whole["trained_updates"]
    wa, wb = (torch.load(r / "model.pt", weights_only=True)["model"] for r in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after the resume"


# --bf16: bf16 autocast where native (or forced by SEQRL_TEST_FORCE_BF16=1), else fp32; --no-bf16:
# fp32. Either way the resumed run is the same run bit for bit: every kernel here is deterministic
# on the CPU.
@pytest.mark.parametrize("bf16", [True, False])
# half way, and in the last update (the evaluation not yet run)
@pytest.mark.parametrize("stop_at", [4, 8])
def test_stopped_by_sigterm_and_resumed_equals_the_uninterrupted_run(
    tmp_path, data_dir, monkeypatch, stop_at, bf16
):
    whole = iem.train(tiny(tmp_path / "whole", data_dir, bf16=bf16))
    assert whole["bf16"] == (bf16 and iem.bf16_native(torch.device("cpu")))
    with monkeypatch.context() as m:
        signal_on_call(iem, m, "update", stop_at)
        with pytest.raises(
            SystemExit, match=rf"interrupted \(SIGTERM\): .*holds {stop_at} updates; continue with "
        ):
            iem.train(tiny(tmp_path / "stopped", data_dir, bf16=bf16))
    run = run_dir_of(tmp_path / "stopped")
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert ckpt["resume"]["updates_done"] == stop_at and ckpt["trained_updates"] == stop_at
    assert not (run / "results.json").exists()
    resumed = iem.train(iem.Args(resume=str(run)))
    assert (
        resumed["run_dir"] == str(run) and json.loads((run / "config.json").read_text())["resumed"]
    )
    assert_same_iem_run(resumed, whole)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run put the handlers back


def test_stopped_during_the_evaluation_resumes_with_it(tmp_path, data_dir, monkeypatch):
    whole = iem.train(tiny(tmp_path / "whole", data_dir))
    real, calls = iem.evaluate, {"n": 0}

    def stopped_in_bc(*a, **kw):  # IEM's evaluation done, BC's interrupted
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("SIGUSR1")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(iem, "evaluate", stopped_in_bc)
        with pytest.raises(
            SystemExit,
            match=r"interrupted \(SIGUSR1\): .*holds 8 updates; continue with `python iem",
        ):
            iem.train(tiny(tmp_path / "stopped", data_dir))
    assert_same_iem_run(iem.train(iem.Args(resume=str(run_dir_of(tmp_path / "stopped")))), whole)


def test_evaluation_leaves_the_training_random_streams_alone(data_dir):
    """Evaluation draws from its own seeded generator and seeded episodes: python's, numpy's and
    torch's global states (dropout's) are as they were, and it plays the same episodes twice."""
    # sampled refinement: the planner does draw numbers
    args = tiny("unused", data_dir, temperature=1.0)
    arch = {k: getattr(args, k) for k in iem.ARCH} | {"grid": [7, 7], "mission_len": 8}
    model = iem.MaskedPlanModel(**arch)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    planning = iem.planning_of(args)
    first = iem.evaluate(model, args.env, args.eval_episodes, planning, refine=True, seed=0)
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert (
        before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2], after[2])
    )
    again = iem.evaluate(model, args.env, args.eval_episodes, planning, refine=True, seed=0)
    assert (
        again["returns"] == first["returns"]
        and again["energy_per_iteration"] == first["energy_per_iteration"]
    )


def test_checkpoints_are_periodic_and_atomic(tmp_path, data_dir, monkeypatch):
    saved = []
    real = iem.save_atomic
    monkeypatch.setattr(
        iem,
        "save_atomic",
        lambda obj, path: saved.append(obj["resume"]["updates_done"]) or real(obj, path),
    )
    iem.train(tiny(tmp_path / "a", data_dir, updates=20, eval_episodes=1))
    assert saved == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # every 10% of the run
    saved.clear()
    iem.train(tiny(tmp_path / "b", data_dir, updates=20, save_every=7, eval_episodes=1))
    assert saved == [7, 14, 20]
    run = Path(run_dir_of(tmp_path / "b"))
    assert {p.name for p in run.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "results.json",
        "model.pt",
    }


def test_a_kill_during_a_save_leaves_the_last_checkpoint_and_resume_succeeds(tmp_path, data_dir):
    args = argv(tmp_path / "runs", data_dir, "--updates", "20", "--save-every", "5")
    # killed while writing the checkpoint of update 10
    run = kill_during_save("iem", args, tmp_path, n=2)
    assert (run / "model.pt.tmp").read_bytes().startswith(b"half")
    assert torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"] == 5
    res = iem.train(iem.Args(resume=str(run)))
    assert res["trained_updates"] == 20 and not (run / "model.pt.tmp").exists()
    steps = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in x
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 19


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(getattr(signal, "SIGUSR1", None), marks=needs_sigusr1)]
)
def test_sigterm_and_sigusr1_save_a_resumable_run_and_print_the_resume_command(
    tmp_path, data_dir, sig
):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "iem.py", *argv(runs, data_dir, "--updates", "1000000")]
    code, out = signal_after(cmd, "train:", tmp_path / "log.txt", sig)
    run = run_dir_of(runs)
    name = signal.Signals(sig).name
    assert code == 1 and "Traceback" not in out and f"interrupted ({name})" in out
    assert f"python iem.py --resume {run}" in out
    done = torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"]
    assert 0 < done < 1_000_000 and f"holds {done} updates" in out


def test_resume_refuses_what_it_cannot_continue(tmp_path, data_dir, monkeypatch):
    with pytest.raises(SystemExit, match="no run of iem.py there"):
        iem.train(iem.Args(resume=str(tmp_path / "nothing")))
    finished = Path(
        iem.train(tiny(tmp_path / "f", data_dir, updates=4, eval_episodes=1))["run_dir"]
    )
    with pytest.raises(SystemExit, match="that run has finished"):
        iem.train(iem.Args(resume=str(finished)))
    with pytest.raises(SystemExit, match="leave out --checkpoint"):
        iem.train(iem.Args(resume=str(finished), checkpoint=str(finished / "model.pt")))
    with monkeypatch.context() as m:
        signal_on_call(iem, m, "update", 2)
        with pytest.raises(SystemExit, match="interrupted"):
            iem.train(tiny(tmp_path / "s", data_dir, updates=4, eval_episodes=1))
    stopped = run_dir_of(tmp_path / "s")
    with pytest.raises(
        SystemExit, match=r"continues that run with its own flags; leave out --lr 0.5 \(the run has"
    ):
        iem.train(iem.Args(resume=str(stopped), lr=0.5))
    with pytest.raises(SystemExit, match="error: --threads -1: must be >= 0"):
        iem.Args(resume=str(stopped), threads=-1)
    # where and how to run may change
    res = iem.train(iem.Args(resume=str(stopped), threads=1, device="cpu"))
    assert res["trained_updates"] == 4


def test_a_run_trained_on_from_a_checkpoint_resumes(tmp_path, data_dir, monkeypatch):
    """--checkpoint X --updates N trains on (a fresh optimizer) and is itself resumable; the count
    goes on from X's updates, and model.pt stays a checkpoint that evaluates alone."""
    first = Path(iem.train(tiny(tmp_path / "a", data_dir, updates=4, eval_episodes=1))["run_dir"])
    on = dict(checkpoint=str(first / "model.pt"), eval_episodes=1, exp_name="on")
    whole = iem.train(tiny(tmp_path / "whole", data_dir, **on))
    with monkeypatch.context() as m:
        signal_on_call(iem, m, "update", 3)
        with pytest.raises(SystemExit, match="holds 7 updates"):  # 4 of the checkpoint, 3 here
            iem.train(tiny(tmp_path / "b", data_dir, **on))
    resumed = iem.train(iem.Args(resume=str(run_dir_of(tmp_path / "b"))))
    assert resumed["trained_updates"] == whole["trained_updates"] == 12
    assert_same_iem_run(resumed, whole)
    ckpt = resumed["run_dir"] + "/model.pt"
    evaluated = iem.train(
        iem.Args(checkpoint=ckpt, updates=0, iterations=3, eval_episodes=1, runs_dir=str(tmp_path))
    )
    assert (
        evaluated["iem"]["returns"] == whole["iem"]["returns"] and "-eval__" in evaluated["run_dir"]
    )
