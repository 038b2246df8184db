"""dt.py survives its interruptions: exact resume, atomic checkpoints, SIGTERM and SIGUSR1 (issue
24)."""

import json
import signal
import sys
from pathlib import Path

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

import dt


def tiny(tmp_path, hdf5_path, **kw):
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), updates=20, batch_size=8,
                n_embd=32, n_layer=2, n_head=2, warmup_steps=5, eval_every=10, eval_episodes=2,
                log_every=3, runs_dir=str(tmp_path))  # fmt: skip
    return dt.Args(**{**base, **kw})


@pytest.mark.parametrize(
    "stop_at", [10, 7]
)  # at an evaluation (its score not yet logged), and between two
def test_stopped_by_sigterm_and_resumed_equals_the_uninterrupted_run(
    tmp_path, hdf5_path, monkeypatch, stop_at
):
    whole = dt.train(tiny(tmp_path / "whole", hdf5_path))
    with monkeypatch.context() as m:
        signal_on_call(dt, m, "update", stop_at)
        with pytest.raises(
            SystemExit, match=rf"interrupted \(SIGTERM\): .*holds {stop_at} updates; continue with "
        ):
            dt.train(tiny(tmp_path / "stopped", hdf5_path))
    run = run_dir_of(tmp_path / "stopped")
    assert torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"] == stop_at
    assert not (run / "results.json").exists()
    resumed = dt.train(dt.Args(resume=str(run)))
    assert (
        resumed["run_dir"] == str(run) and json.loads((run / "config.json").read_text())["resumed"]
    )
    assert_same_run(resumed, whole)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run put the handlers back


def test_stopped_during_an_evaluation_resumes_with_that_evaluation(
    tmp_path, hdf5_path, monkeypatch
):
    whole = dt.train(tiny(tmp_path / "whole", hdf5_path))
    real, calls = dt.evaluate, {"n": 0}

    def stopped_in_the_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("SIGUSR1")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(dt, "evaluate", stopped_in_the_second)
        with pytest.raises(SystemExit, match=r"interrupted \(SIGUSR1\): .*holds 10 updates"):
            dt.train(tiny(tmp_path / "stopped", hdf5_path))
    assert_same_run(dt.train(dt.Args(resume=str(run_dir_of(tmp_path / "stopped")))), whole)


def test_checkpoints_are_periodic_and_atomic(tmp_path, hdf5_path, monkeypatch):
    saved = []
    real = dt.save_atomic
    monkeypatch.setattr(
        dt,
        "save_atomic",
        lambda obj, path: saved.append(obj["resume"]["updates_done"]) or real(obj, path),
    )
    dt.train(tiny(tmp_path / "a", hdf5_path, updates=30, eval_every=0))
    # every 10% of the run without evaluations
    assert saved == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    saved.clear()
    dt.train(tiny(tmp_path / "b", hdf5_path, updates=20, eval_every=10))
    assert saved == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # every evaluation (10, 20) and every 10%
    saved.clear()
    dt.train(tiny(tmp_path / "c", hdf5_path, updates=20, save_every=7))
    assert saved == [7, 14, 20]
    assert (
        dt.save_due(0, 20, 10, 0) and not dt.save_due(5, 100, 50, 0) and dt.save_due(50, 100, 50, 0)
    )


def test_a_kill_during_a_save_leaves_the_last_checkpoint_and_resume_succeeds(tmp_path, hdf5_path):
    argv = ["--env", "hopper-random", "--dataset-path", str(hdf5_path), "--runs-dir",
            str(tmp_path / "runs"), "--updates", "20", "--batch-size", "8", "--n-embd", "16",
            "--n-layer", "1", "--eval-every", "0", "--save-every", "5", "--eval-episodes", "1",
            "--threads", "1"]  # fmt: skip
    # killed while writing the checkpoint of update 10
    run = kill_during_save("dt", argv, tmp_path, n=2)
    assert (run / "model.pt.tmp").read_bytes().startswith(b"half")
    assert torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"] == 5
    res = dt.train(dt.Args(resume=str(run)))
    assert res["trained_updates"] == 20 and not (run / "model.pt.tmp").exists()
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, pytest.param(getattr(signal, "SIGUSR1", None), marks=needs_sigusr1)]
)
def test_sigterm_and_sigusr1_save_a_resumable_run_and_print_the_resume_command(
    tmp_path, hdf5_path, sig
):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "dt.py", "--env", "hopper-random", "--dataset-path", str(hdf5_path),
           "--runs-dir", str(runs), "--updates", "1000000", "--batch-size", "4", "--n-embd", "16",
           "--n-layer", "1", "--eval-episodes", "1", "--eval-every", "1000000",
           "--threads", "1"]  # fmt: skip
    code, out = signal_after(cmd, "update 0:", tmp_path / "log.txt", sig)
    run = run_dir_of(runs)
    name = signal.Signals(sig).name
    assert code == 1 and "Traceback" not in out and f"interrupted ({name})" in out
    assert f"python dt.py --resume {run}" in out
    done = torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"]
    assert 0 < done < 1_000_000 and f"holds {done} updates" in out


def test_resume_refuses_what_it_cannot_continue(tmp_path, hdf5_path, monkeypatch):
    with pytest.raises(SystemExit, match="no run of dt.py there"):
        dt.train(dt.Args(resume=str(tmp_path / "nothing")))
    finished = Path(dt.train(tiny(tmp_path / "f", hdf5_path, updates=4, eval_every=0))["run_dir"])
    with pytest.raises(SystemExit, match="that run has finished"):
        dt.train(dt.Args(resume=str(finished)))
    with monkeypatch.context() as m:
        signal_on_call(dt, m, "update", 2)
        with pytest.raises(SystemExit, match="interrupted"):
            dt.train(tiny(tmp_path / "s", hdf5_path, updates=4, eval_every=0))
    stopped = run_dir_of(tmp_path / "s")
    with pytest.raises(SystemExit, match=r"leave out --checkpoint .*model.pt \(the run has None\)"):
        dt.train(dt.Args(resume=str(stopped), checkpoint=str(finished / "model.pt")))
    with pytest.raises(
        SystemExit, match=r"continues that run with its own flags; leave out --lr 0.5 \(the run has"
    ):
        dt.train(dt.Args(resume=str(stopped), lr=0.5))
    # where and how to run may change
    res = dt.train(dt.Args(resume=str(stopped), threads=1, device="cpu"))
    assert res["trained_updates"] == 4


def test_a_batch_stream_saved_on_another_device_is_replaced_and_said(
    tmp_path, hdf5_path, monkeypatch, capsys
):
    with monkeypatch.context() as m:
        signal_on_call(dt, m, "update", 2)
        with pytest.raises(SystemExit):
            dt.train(tiny(tmp_path, hdf5_path, updates=4, eval_every=0))
    run = run_dir_of(tmp_path)
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["resume"]["rng"]["batch_device"] = "cuda"  # as if a GPU had written it
    torch.save(ckpt, run / "model.pt")
    assert dt.train(dt.Args(resume=str(run)))["trained_updates"] == 4
    assert "saved on cuda: a fresh batch stream (not bit-exact)" in capsys.readouterr().out


def test_a_run_that_trained_on_from_a_checkpoint_resumes(tmp_path, hdf5_path, monkeypatch):
    parent = (
        Path(dt.train(tiny(tmp_path / "p", hdf5_path, updates=4, eval_every=0))["run_dir"])
        / "model.pt"
    )
    whole = dt.train(tiny(tmp_path / "whole", hdf5_path, checkpoint=str(parent), updates=10))
    with monkeypatch.context() as m:
        signal_on_call(dt, m, "update", 5)
        with pytest.raises(SystemExit, match="holds 9 updates"):  # 4 of the parent's + 5
            dt.train(tiny(tmp_path / "stopped", hdf5_path, checkpoint=str(parent), updates=10))
    resumed = dt.train(dt.Args(resume=str(run_dir_of(tmp_path / "stopped"))))
    assert resumed["trained_updates"] == 14
    assert_same_run(resumed, whole)


def test_a_warmup_longer_than_the_run_is_scaled_to_a_tenth_and_said(capsys):
    assert dt.Args(updates=50, warmup_steps=10_000).warmup_steps == 5
    assert (
        "--warmup-steps 10000 is longer than --updates 50; warming up over 5"
        in capsys.readouterr().out
    )
    assert (
        dt.Args(updates=50, warmup_steps=50).warmup_steps == 50
        and dt.Args(updates=0, checkpoint="x").warmup_steps
    )
