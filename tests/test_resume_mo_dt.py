"""mo_dt.py survives its interruptions: exact resume, atomic checkpoints, SIGTERM and SIGUSR1
(issue 24). The checks are functions of the method module, so that tests/test_resume_trdt.py runs
the same ones on trdt.py."""

import json
import random
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from resume_check import assert_same_run, kill_during_save, needs_sigusr1
from resume_check import run_dir_of, signal_after, signal_on_call

import mo_dt


def tiny(module, tmp_path, hdf5_path, **kw):
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), updates=20, batch_size=8,
                n_embd=32, n_layer=2, n_head=2, warmup_steps=5, eval_every=10, eval_episodes=2,
                log_every=3, runs_dir=str(tmp_path))  # fmt: skip
    return module.Args(**{**base, **kw})


def check_sigterm_then_resume(module, tmp_path, hdf5_path, monkeypatch, stop_at, **flags):
    """A real SIGTERM during update `stop_at`: the run finishes it, saves and stops; --resume then
    gives the run that was never stopped, bit for bit, in the precision the flags ask for (--bf16:
    bf16 where native or forced by SEQRL_TEST_FORCE_BF16=1; --no-bf16: fp32)."""
    whole = module.train(tiny(module, tmp_path / "whole", hdf5_path, **flags))
    bf16 = flags.get("bf16", True) and module.bf16_native(torch.device("cpu"))
    assert whole["bf16"] == bf16
    stopped = rf"interrupted \(SIGTERM\): .*holds {stop_at} updates; continue with "
    with monkeypatch.context() as m:
        signal_on_call(module, m, "update", stop_at)
        with pytest.raises(SystemExit, match=stopped):
            module.train(tiny(module, tmp_path / "stopped", hdf5_path, **flags))
    run = run_dir_of(tmp_path / "stopped")
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["resume"]["updates_done"] == stop_at and not (run / "results.json").exists()
    resumed = module.train(module.Args(resume=str(run)))
    assert resumed["run_dir"] == str(run) and resumed["bf16"] == bf16
    assert json.loads((run / "config.json").read_text())["resumed"]
    assert_same_run(resumed, whole)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run put the handlers back
    return saved


def check_stop_during_an_evaluation(module, tmp_path, hdf5_path, monkeypatch):
    whole = module.train(tiny(module, tmp_path / "whole", hdf5_path))
    real, calls = module.evaluate, {"n": 0}

    def stopped_in_the_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("SIGUSR1")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(module, "evaluate", stopped_in_the_second)
        with pytest.raises(SystemExit, match=r"interrupted \(SIGUSR1\): .*holds 10 updates"):
            module.train(tiny(module, tmp_path / "stopped", hdf5_path))
    resumed = module.train(module.Args(resume=str(run_dir_of(tmp_path / "stopped"))))
    assert_same_run(resumed, whole)


def check_evaluation_leaves_the_random_streams_alone(module, tmp_path, hdf5_path, monkeypatch):
    """An exact resume needs evaluation not to draw from python's, numpy's or torch's random
    streams: a run stopped before an evaluation draws its next batch and dropout masks after it."""
    states, real = [], module.evaluate

    def streams():
        return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()

    def watched(*a, **kw):
        before = streams()
        res = real(*a, **kw)
        states.append((before, streams()))
        return res

    monkeypatch.setattr(module, "evaluate", watched)
    module.train(tiny(module, tmp_path, hdf5_path, updates=4, eval_every=2, dropout=0.5))
    assert len(states) == 3
    for (py0, np0, t0), (py1, np1, t1) in states:
        assert py0 == py1 and np.array_equal(np0, np1) and torch.equal(t0, t1)


def check_periodic_atomic_saves(module, tmp_path, hdf5_path, monkeypatch):
    saved, real = [], module.save_atomic

    def counted(obj, path):
        saved.append(obj["resume"]["updates_done"])
        real(obj, path)

    monkeypatch.setattr(module, "save_atomic", counted)
    module.train(tiny(module, tmp_path / "a", hdf5_path, updates=30, eval_every=0))
    assert saved == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]  # every 10% of the run, no evaluations
    saved.clear()
    module.train(tiny(module, tmp_path / "b", hdf5_path, eval_every=10, save_every=7))
    assert saved == [7, 14, 20]  # --save-every replaces the default; the end is always saved
    assert not list((tmp_path / "b").glob("*/model.pt.tmp"))


def cli(hdf5_path, runs, **flags) -> list:
    """A tiny run's command-line flags."""
    flags = (
        dict(
            env="hopper-random",
            dataset_path=str(hdf5_path),
            runs_dir=str(runs),
            batch_size=8,
            n_embd=16,
            n_layer=1,
            n_head=1,
            eval_episodes=1,
            threads=1,
        )
        | flags
    )
    return [str(x) for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", v)]


def check_kill_during_a_save(module, tmp_path, hdf5_path):
    argv = cli(hdf5_path, tmp_path / "runs", updates=20, eval_every=0, save_every=5)
    run = kill_during_save(module.__name__, argv, tmp_path, n=2)  # killed saving update 10
    assert (run / "model.pt.tmp").read_bytes().startswith(b"half")
    assert torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"] == 5
    res = module.train(module.Args(resume=str(run)))
    assert res["trained_updates"] == 20 and not (run / "model.pt.tmp").exists()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def check_signal_on_the_script(module, tmp_path, hdf5_path, sig):
    runs, name = tmp_path / "runs", module.__name__
    flags = cli(hdf5_path, runs, batch_size=4, updates=1_000_000, eval_every=1_000_000)
    cmd = [sys.executable, f"{name}.py", *flags]
    code, out = signal_after(cmd, "update 0:", tmp_path / "log", sig)
    run = run_dir_of(runs)
    assert code == 1 and "Traceback" not in out
    assert f"interrupted ({signal.Signals(sig).name})" in out
    assert f"python {name}.py --resume {run}" in out
    done = torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"]
    assert 0 < done < 1_000_000 and f"holds {done} updates" in out


def check_bad_resumes(module, tmp_path, hdf5_path, monkeypatch):
    resume = lambda run, **kw: module.train(module.Args(resume=str(run), **kw))
    with pytest.raises(SystemExit, match=f"no run of {module.__name__}.py there"):
        resume(tmp_path / "nothing")
    finished = module.train(tiny(module, tmp_path / "f", hdf5_path, updates=4, eval_every=0))
    finished = Path(finished["run_dir"])
    with pytest.raises(SystemExit, match="that run has finished"):
        resume(finished)
    with monkeypatch.context() as m:
        signal_on_call(module, m, "update", 2)
        with pytest.raises(SystemExit, match="interrupted"):
            module.train(tiny(module, tmp_path / "s", hdf5_path, updates=4, eval_every=0))
    stopped = run_dir_of(tmp_path / "s")
    with pytest.raises(SystemExit, match=r"leave out --checkpoint .*model.pt \(the run has None\)"):
        resume(stopped, checkpoint=str(finished / "model.pt"))
    own = r"continues that run with its own flags; leave out --lr 0.5 \(the run has"
    with pytest.raises(SystemExit, match=own):
        resume(stopped, lr=0.5)
    with pytest.raises(SystemExit, match=r"leave out --lambdas"):
        resume(stopped, lambdas=(1.0,) + (0.0,) * (len(module.TASKS) - 1))
    old = torch.load(stopped / "model.pt", weights_only=True)
    older = {k: v for k, v in old.items() if k != "resume"}  # an older version's model.pt
    torch.save(older, stopped / "model.pt")
    with pytest.raises(SystemExit, match="holds no training state"):
        resume(stopped)
    torch.save(old, stopped / "model.pt")
    res = resume(stopped, threads=1, device="cpu")  # where and how to run may change
    assert res["trained_updates"] == 4


def check_a_stopped_runs_model_is_a_checkpoint(module, tmp_path, hdf5_path, monkeypatch):
    """model.pt keeps every key it had before resumes existed: --checkpoint evaluates it and trains
    on from it."""
    with monkeypatch.context() as m:
        signal_on_call(module, m, "update", 3)
        with pytest.raises(SystemExit):
            module.train(tiny(module, tmp_path / "s", hdf5_path, updates=6, eval_every=0))
    ckpt = run_dir_of(tmp_path / "s") / "model.pt"
    saved = torch.load(ckpt, weights_only=True)
    keys = {"model", "method", "arch", "args", "dataset", "trained_updates", "state_mean",
            "state_std", "resume"}  # fmt: skip
    assert set(saved) == keys and saved["trained_updates"] == 3
    ev = module.Args(checkpoint=str(ckpt), updates=0, eval_episodes=1, runs_dir=str(tmp_path / "e"))
    ev = module.train(ev)
    kind = Path(ev["run_dir"]).name.split("__")[1]
    assert kind == f"{module.METHOD}-eval" and ev["trained_updates"] == 3
    on = tiny(module, tmp_path / "o", hdf5_path, checkpoint=str(ckpt), updates=2, eval_every=0)
    on = module.train(on)
    kind = Path(on["run_dir"]).name.split("__")[1]
    assert on["trained_updates"] == 5 and kind == module.METHOD


def lamb_steps(saved) -> set:
    return {g["step"] for g in saved["resume"]["optimizer"]["param_groups"]}


# --- mo_dt.py ------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_at, flags", [
    (10, {}), (7, {}), (7, dict(schedule="alternating")), (7, dict(bf16=False)),
], ids=["at-an-evaluation", "between", "alternating", "fp32"])  # fmt: skip
def test_resumed_run_is_the_uninterrupted_one(tmp_path, hdf5_path, monkeypatch, stop_at, flags):
    saved = check_sigterm_then_resume(mo_dt, tmp_path, hdf5_path, monkeypatch, stop_at, **flags)
    per_update = len(mo_dt.TASKS) if flags.get("schedule") == "alternating" else 1
    assert lamb_steps(saved) == {stop_at * per_update}  # LAMB's count: one step per task


def test_stopped_during_an_evaluation_resumes_with_it(tmp_path, hdf5_path, monkeypatch):
    check_stop_during_an_evaluation(mo_dt, tmp_path, hdf5_path, monkeypatch)


def test_resume_evaluation_draws_no_training_randomness(tmp_path, hdf5_path, monkeypatch):
    check_evaluation_leaves_the_random_streams_alone(mo_dt, tmp_path, hdf5_path, monkeypatch)


def test_resume_checkpoints_are_periodic_and_atomic(tmp_path, hdf5_path, monkeypatch):
    check_periodic_atomic_saves(mo_dt, tmp_path, hdf5_path, monkeypatch)


def test_a_kill_during_a_save_leaves_the_last_checkpoint(tmp_path, hdf5_path):
    check_kill_during_a_save(mo_dt, tmp_path, hdf5_path)


SIGNALS = [signal.SIGTERM, pytest.param(getattr(signal, "SIGUSR1", None), marks=needs_sigusr1)]


@pytest.mark.parametrize("sig", SIGNALS)
def test_sigterm_and_sigusr1_print_the_resume_command(tmp_path, hdf5_path, sig):
    check_signal_on_the_script(mo_dt, tmp_path, hdf5_path, sig)


def test_resume_refuses_what_it_cannot_continue(tmp_path, hdf5_path, monkeypatch):
    check_bad_resumes(mo_dt, tmp_path, hdf5_path, monkeypatch)


def test_resume_leaves_model_pt_a_valid_checkpoint(tmp_path, hdf5_path, monkeypatch):
    check_a_stopped_runs_model_is_a_checkpoint(mo_dt, tmp_path, hdf5_path, monkeypatch)
