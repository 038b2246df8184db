"""tt.py survives its interruptions: exact resume, atomic checkpoints, SIGTERM and SIGUSR1 (issue
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
    assert_same_run,
    kill_during_save,
    needs_sigusr1,
    run_dir_of,
    signal_after,
    signal_on_call,
)

import tt

SMALL = [
    "--n-bins",
    "10",
    "--seq-len",
    "3",
    "--max-context",
    "2",
    "--n-embd",
    "16",
    "--n-layer",
    "1",
    "--n-head",
    "1",
    "--batch-size",
    "4",
    "--horizon",
    "1",
    "--beam-width",
    "2",
    "--eval-episodes",
    "1",
    "--eval-max-steps",
    "4",
    "--threads",
    "1",
]


def tiny(tmp_path, hdf5_path, **kw):
    base = dict(
        env="hopper-random",
        dataset_path=(str(hdf5_path),),
        n_bins=20,
        seq_len=3,
        n_layer=2,
        n_head=2,
        n_embd=32,
        batch_size=8,
        updates=20,
        warmup_epochs=0.01,
        decay_epochs=1.0,
        horizon=2,
        beam_width=3,
        max_context=2,
        eval_episodes=2,
        eval_max_steps=8,
        eval_every=10,
        log_every=3,
        runs_dir=str(tmp_path),
    )
    return tt.Args(**{**base, **kw})


# at an evaluation (its score not yet logged), and between two
@pytest.mark.parametrize("stop_at", [10, 7])
def test_stopped_by_sigterm_and_resumed_equals_the_uninterrupted_run(
    tmp_path, hdf5_path, monkeypatch, stop_at
):
    whole = tt.train(tiny(tmp_path / "whole", hdf5_path))
    with monkeypatch.context() as m:
        signal_on_call(tt, m, "update", stop_at)
        with pytest.raises(
            SystemExit, match=rf"interrupted \(SIGTERM\): .*holds {stop_at} updates; continue with "
        ):
            tt.train(tiny(tmp_path / "stopped", hdf5_path))
    run = run_dir_of(tmp_path / "stopped")
    ckpt = torch.load(run / "model.pt", weights_only=True)
    assert (
        ckpt["resume"]["updates_done"] == stop_at
        and ckpt["resume"]["scheduler"]["last_epoch"] == stop_at
    )
    assert not (run / "results.json").exists()
    resumed = tt.train(tt.Args(resume=str(run)))
    assert (
        resumed["run_dir"] == str(run) and json.loads((run / "config.json").read_text())["resumed"]
    )
    assert_same_run(resumed, whole)
    assert resumed["sources"] == whole["sources"] and resumed["sources"]["k_act"] == "TT base"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run put the handlers back
    # model.pt stays a --checkpoint: evaluating it again gives the run's final score
    again = tt.train(
        tt.Args(
            checkpoint=str(run / "model.pt"),
            updates=0,
            horizon=2,
            beam_width=3,
            max_context=2,
            eval_episodes=2,
            eval_max_steps=8,
            runs_dir=str(tmp_path / "ev"),
        )
    )
    assert again["returns"] == whole["returns"] and again["trained_updates"] == 20


def test_stopped_during_an_evaluation_resumes_with_that_evaluation(
    tmp_path, hdf5_path, monkeypatch
):
    whole = tt.train(tiny(tmp_path / "whole", hdf5_path))
    real, calls = tt.evaluate, {"n": 0}

    def stopped_in_the_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("SIGUSR1")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(tt, "evaluate", stopped_in_the_second)
        with pytest.raises(SystemExit, match=r"interrupted \(SIGUSR1\): .*holds 10 updates"):
            tt.train(tiny(tmp_path / "stopped", hdf5_path))
    assert_same_run(tt.train(tt.Args(resume=str(run_dir_of(tmp_path / "stopped")))), whole)


def test_evaluation_leaves_the_training_random_streams_alone(tmp_path, hdf5_path):
    """An evaluation between two updates must not draw from the streams training draws from (python,
    numpy, torch), or a run resumed after it would differ from one that never stopped."""
    args = tiny(tmp_path, hdf5_path, updates=1)
    ckpt = torch.load(Path(tt.train(args)["run_dir"]) / "model.pt", weights_only=True)
    model = tt.TrajectoryTransformer(11, 3, 20, 3, 2, 2, 32, 0.1)
    model.load_state_dict(ckpt["model"])
    disc = tt.Discretizer(ckpt["edges"])
    info = ckpt["dataset"]
    states = lambda: (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
    before = states()
    planner, n, max_steps = tt.plan_settings(args), args.eval_episodes, args.eval_max_steps
    fp32 = torch.autocast("cpu", enabled=False)
    tt.evaluate(model, disc, info, planner, n, max_steps, args.seed, torch.device("cpu"), fp32)
    after = states()
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


def test_checkpoints_are_periodic_and_atomic(tmp_path, hdf5_path, monkeypatch):
    saved = []
    real = tt.save_atomic
    monkeypatch.setattr(
        tt,
        "save_atomic",
        lambda obj, path: saved.append(obj["resume"]["updates_done"]) or real(obj, path),
    )
    tt.train(tiny(tmp_path / "a", hdf5_path, updates=30, eval_every=0))
    # every 10% of the run without evaluations
    assert saved == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    saved.clear()
    tt.train(tiny(tmp_path / "b", hdf5_path, updates=20, eval_every=10))
    assert saved == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # every evaluation (10, 20) and every 10%
    saved.clear()
    tt.train(tiny(tmp_path / "c", hdf5_path, updates=20, save_every=7, eval_every=0))
    assert saved == [7, 14, 20]


def test_a_kill_during_a_save_leaves_the_last_checkpoint_and_resume_succeeds(tmp_path, hdf5_path):
    argv = [
        "--env",
        "hopper-random",
        "--dataset-path",
        str(hdf5_path),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--updates",
        "20",
        "--eval-every",
        "0",
        "--save-every",
        "5",
        *SMALL,
    ]
    # killed while writing the checkpoint of update 10
    run = kill_during_save("tt", argv, tmp_path, n=2)
    assert (run / "model.pt.tmp").read_bytes().startswith(b"half")
    assert torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"] == 5
    res = tt.train(tt.Args(resume=str(run)))
    assert res["trained_updates"] == 20 and not (run / "model.pt.tmp").exists()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(getattr(signal, "SIGUSR1", None), marks=needs_sigusr1)]
)
def test_sigterm_and_sigusr1_save_a_resumable_run_and_print_the_resume_command(
    tmp_path, hdf5_path, sig
):
    """A `timeout`-stopped tt.py run kept nothing before (issue 24): now it keeps a resumable
    checkpoint."""
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        "tt.py",
        "--env",
        "hopper-random",
        "--dataset-path",
        str(hdf5_path),
        "--runs-dir",
        str(runs),
        "--updates",
        "1000000",
        "--eval-every",
        "1000000",
        *SMALL,
    ]
    code, out = signal_after(cmd, "update 0:", tmp_path / "log.txt", sig)
    run = run_dir_of(runs)
    name = signal.Signals(sig).name
    assert code == 1 and "Traceback" not in out and f"interrupted ({name})" in out
    assert f"python tt.py --resume {run}" in out
    done = torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"]
    assert 0 < done < 1_000_000 and f"holds {done} updates" in out


def test_resume_refuses_what_it_cannot_continue(tmp_path, hdf5_path, monkeypatch):
    with pytest.raises(SystemExit, match="no run of tt.py there"):
        tt.train(tt.Args(resume=str(tmp_path / "nothing")))
    finished = Path(tt.train(tiny(tmp_path / "f", hdf5_path, updates=4, eval_every=0))["run_dir"])
    with pytest.raises(SystemExit, match="that run has finished"):
        tt.train(tt.Args(resume=str(finished)))
    with monkeypatch.context() as m:
        signal_on_call(tt, m, "update", 2)
        with pytest.raises(SystemExit, match="interrupted"):
            tt.train(tiny(tmp_path / "s", hdf5_path, updates=4, eval_every=0))
    stopped = run_dir_of(tmp_path / "s")
    with pytest.raises(SystemExit, match=r"leave out --checkpoint .*model.pt \(the run has None\)"):
        tt.train(tt.Args(resume=str(stopped), checkpoint=str(finished / "model.pt")))
    with pytest.raises(
        SystemExit, match=r"continues that run with its own flags; leave out --lr 0.5 \(the run has"
    ):
        tt.train(tt.Args(resume=str(stopped), lr=0.5))
    old = torch.load(stopped / "model.pt", weights_only=True)
    del old["resume"]  # a model.pt of the version before resume
    torch.save(old, tmp_path / "old.pt")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text((stopped / "config.json").read_text())
    (tmp_path / "old" / "model.pt").write_bytes((tmp_path / "old.pt").read_bytes())
    with pytest.raises(SystemExit, match="holds no training state"):
        tt.train(tt.Args(resume=str(tmp_path / "old")))
    # where and how to run may change
    res = tt.train(tt.Args(resume=str(stopped), threads=1, device="cpu"))
    assert res["trained_updates"] == 4


def test_a_batch_stream_saved_on_another_device_is_replaced_and_said(
    tmp_path, hdf5_path, monkeypatch, capsys
):
    with monkeypatch.context() as m:
        signal_on_call(tt, m, "update", 2)
        with pytest.raises(SystemExit):
            tt.train(tiny(tmp_path, hdf5_path, updates=4, eval_every=0))
    run = run_dir_of(tmp_path)
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["resume"]["rng"]["batch_device"] = "cuda"  # as if a GPU had written it
    torch.save(ckpt, run / "model.pt")
    assert tt.train(tt.Args(resume=str(run)))["trained_updates"] == 4
    assert "saved on cuda: a fresh batch stream (not bit-exact)" in capsys.readouterr().out
