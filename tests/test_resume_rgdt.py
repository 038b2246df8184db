"""rgdt.py survives its interruptions in both phases: exact resume, atomic checkpoints, SIGTERM and
SIGUSR1 (issue 24)."""

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

import common
import rgdt


def tiny(runs, hdf5_path, **kw):
    base = dict(
        env="hopper-random",
        dataset_path=(str(hdf5_path),),
        updates=20,
        inv_updates=20,
        batch_size=8,
        inv_batch_size=16,
        n_embd=32,
        n_enc_layer=1,
        n_layer=2,
        n_head=2,
        inv_hidden=32,
        warmup_steps=5,
        eval_every=10,
        eval_episodes=2,
        log_every=3,
        runs_dir=str(runs),
    )
    return rgdt.Args(**{**base, **kw})


@pytest.fixture(scope="module")
def whole(tmp_path_factory, hdf5_path):
    """The run that is never stopped, which every stopped and resumed run must equal."""
    return rgdt.train(tiny(tmp_path_factory.mktemp("whole"), hdf5_path))


def assert_same_run(stopped: dict, whole: dict) -> None:
    """resume_check's assert_same_run with the phase in each line's key (both phases count their
    steps from 0): the same metrics lines, none written twice, the same returns, update counts and
    weights of both models."""
    a, b = Path(stopped["run_dir"]), Path(whole["run_dir"])
    assert [without_timing(x) for x in lines(a)] == [without_timing(x) for x in lines(b)]
    keys = [(x["phase"], x["step"], "eval_normalized" in x) for x in lines(a)]
    assert len(keys) == len(set(keys)), "a step was written twice"
    for key in ("returns", "updates", "inv_updates", "trained_updates", "trained_inv_updates"):
        assert stopped[key] == whole[key], key
    wa, wb = (torch.load(r / "model.pt", weights_only=True) for r in (a, b))
    for key in ("model", "inverse_dynamics"):
        assert wa[key].keys() == wb[key].keys()
        for name in wa[key]:
            assert torch.equal(wa[key][name], wb[key][name]), (
                f"{key}.{name} differs after the resume"
            )


@pytest.mark.parametrize("update, n, phase, done", [
    ("update_inverse", 7, "inverse", 7),  # in the inverse dynamics' phase, between two checkpoints
    ("update_inverse", 20, "inverse", 20),  # at its last update: the translator has not started
    ("update", 7, "translator", 7),  # in the translator's phase
    ("update", 10, "translator", 10),  # at an evaluation, its score not yet logged
])  # fmt: skip
def test_stopped_by_sigterm_in_either_phase_and_resumed_equals_the_uninterrupted_run(
    tmp_path, hdf5_path, monkeypatch, whole, update, n, phase, done
):
    counts = {
        "inverse": done if phase == "inverse" else 20,
        "translator": done if phase == "translator" else 0,
    }
    holds = (
        f"holds translator {counts['translator']}, inverse dynamics {counts['inverse']} updates; "
        "continue with"
    )
    with monkeypatch.context() as m:
        signal_on_call(rgdt, m, update, n)
        with pytest.raises(
            SystemExit, match=rf"interrupted \(SIGTERM\): .*{holds} `python rgdt.py --resume "
        ):
            rgdt.train(tiny(tmp_path, hdf5_path))
    run = run_dir_of(tmp_path)
    saved = torch.load(run / "model.pt", weights_only=True)
    assert (
        saved["resume"]["progress"] == {"phase": phase, **counts}
        and saved["resume"]["updates_done"] == done
    )
    assert (saved["trained_updates"], saved["trained_inv_updates"]) == (
        counts["translator"],
        counts["inverse"],
    )
    assert not (run / "results.json").exists()
    resumed = rgdt.train(rgdt.Args(resume=str(run)))
    assert resumed["run_dir"] == str(run)
    (record,) = json.loads((run / "config.json").read_text())["resumed"]
    assert (record["phase"], record["at_update"]) == (phase, done)
    assert_same_run(resumed, whole)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run put the handlers back


@pytest.mark.parametrize("n, message", [
    # before any update
    (1, r"interrupted \(SIGUSR1\): .*holds translator 0, inverse dynamics 0 updates"),
    # between the phases
    (2, r"interrupted \(SIGUSR1\): .*holds translator 0, inverse dynamics 20 updates"),
    (3, r"interrupted \(SIGUSR1\): .*holds translator 10, inverse dynamics 20 updates"),
    (4, r"interrupted \(SIGUSR1\) during the final evaluation; .*finish the run with "
        r"`python rgdt.py --resume"),
])  # fmt: skip
def test_stopped_during_an_evaluation_resumes_with_that_evaluation(
    tmp_path, hdf5_path, monkeypatch, whole, n, message
):
    real, calls = rgdt.evaluate, {"n": 0}

    def stopped_in_the_nth(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("SIGUSR1")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(rgdt, "evaluate", stopped_in_the_nth)
        with pytest.raises(SystemExit, match=message):
            rgdt.train(tiny(tmp_path, hdf5_path))
    assert_same_run(rgdt.train(rgdt.Args(resume=str(run_dir_of(tmp_path)))), whole)


def test_evaluation_leaves_every_training_random_stream_alone(hdf5_path):
    """Else a resumed run, which skips the evaluations logged before its checkpoint, could not be
    exact."""
    _, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    arch = dict(
        state_dim=11,
        act_dim=3,
        return_len=4,
        state_len=3,
        n_enc_layer=1,
        n_layer=1,
        n_head=2,
        n_embd=16,
        dropout=0.1,
        rtg_scale=1000.0,
        inv_hidden=16,
        inv_layers=1,
        inv_dropout=0.1,
    )
    model, inv = rgdt.make_models(arch, torch.device("cpu"))
    stats = (np.zeros(11, np.float32), np.ones(11, np.float32))
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    settings, off = rgdt.EvalSettings(episodes=2), torch.autocast("cpu", enabled=False)
    conditioning, cpu = np.full(1000, 100.0), torch.device("cpu")
    res = rgdt.evaluate(model, inv, info, stats, conditioning, settings, cpu, off)
    assert sum(res["lengths"]) > 0
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0], "python's random state moved"
    assert (before[1] == after[1]).all(), "numpy's random state moved"
    assert torch.equal(before[2], after[2]), "torch's random state moved"


def test_checkpoints_are_periodic_in_each_phase(tmp_path, hdf5_path, monkeypatch):
    saved, real = [], rgdt.save_atomic
    fake = dict(returns=[0.0], lengths=[1], normalized=[0.0], return_mean=0.0, normalized_mean=0.0,
                normalized_std=0.0, eval_env_steps_per_s=1.0)  # fmt: skip
    monkeypatch.setattr(rgdt, "evaluate", lambda *a, **kw: fake)  # only the schedule matters here

    def recording(obj, path):
        saved.append((obj["resume"]["progress"]["phase"][0], obj["resume"]["updates_done"]))
        real(obj, path)

    monkeypatch.setattr(rgdt, "save_atomic", recording)
    rgdt.train(tiny(tmp_path / "a", hdf5_path, updates=30, eval_every=0))
    # every 10% of each
    assert saved == [("i", n) for n in range(2, 21, 2)] + [("t", n) for n in range(3, 31, 3)]
    saved.clear()
    rgdt.train(tiny(tmp_path / "b", hdf5_path, updates=20, inv_updates=10, eval_every=5))
    assert saved == [("i", n) for n in range(1, 11)] + [
        ("t", n) for n in (2, 4, 5, 6, 8, 10, 12, 14, 15, 16, 18, 20)
    ]
    saved.clear()
    rgdt.train(tiny(tmp_path / "c", hdf5_path, save_every=7))
    assert saved == [("i", 7), ("i", 14), ("i", 20), ("t", 7), ("t", 14), ("t", 20)]


def test_a_kill_during_a_save_leaves_the_last_checkpoint_and_resume_succeeds(tmp_path, hdf5_path):
    argv = [
        "--env",
        "hopper-random",
        "--dataset-path",
        str(hdf5_path),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--updates",
        "10",
        "--inv-updates",
        "10",
        "--batch-size",
        "8",
        "--inv-batch-size",
        "8",
        "--n-embd",
        "16",
        "--n-layer",
        "1",
        "--n-enc-layer",
        "1",
        "--inv-hidden",
        "16",
        "--eval-every",
        "0",
        "--save-every",
        "5",
        "--eval-episodes",
        "1",
        "--threads",
        "1",
    ]
    # killed while writing the translator's first checkpoint
    run = kill_during_save("rgdt", argv, tmp_path, n=3)
    assert (run / "model.pt.tmp").read_bytes().startswith(b"half")
    state = torch.load(run / "model.pt", weights_only=True)["resume"]
    assert state["progress"] == {"phase": "inverse", "inverse": 10, "translator": 0}
    res = rgdt.train(rgdt.Args(resume=str(run)))
    assert (res["trained_updates"], res["trained_inv_updates"]) == (10, 10) and not (
        run / "model.pt.tmp"
    ).exists()
    steps = [(m["phase"], m["step"]) for m in lines(run)]
    assert steps == [
        ("inverse", 0),
        ("inverse", 9),
        ("translator", 0),
        ("translator", 9),
        ("final", 10),
    ]


CLI = [
    "--env",
    "hopper-random",
    "--batch-size",
    "4",
    "--inv-batch-size",
    "8",
    "--n-embd",
    "16",
    "--n-layer",
    "1",
    "--n-enc-layer",
    "1",
    "--inv-hidden",
    "16",
    "--eval-episodes",
    "1",
    "--eval-every",
    "1000000",
    "--threads",
    "1",
]


@pytest.mark.parametrize("sig, phase", [
    (signal.SIGTERM, "inverse"),  # `timeout`, SLURM and Kubernetes before a kill
    # SLURM's --signal
    pytest.param(getattr(signal, "SIGUSR1", None), "translator", marks=needs_sigusr1),
])  # fmt: skip
def test_sigterm_and_sigusr1_save_a_resumable_run_and_print_the_resume_command(
    tmp_path, hdf5_path, sig, phase
):
    runs = tmp_path / "runs"
    budget = (
        ["--inv-updates", "1000000", "--updates", "10"]
        if phase == "inverse"
        else ["--inv-updates", "3", "--updates", "1000000"]
    )
    cmd = [
        sys.executable,
        "rgdt.py",
        *CLI,
        "--dataset-path",
        str(hdf5_path),
        "--runs-dir",
        str(runs),
        *budget,
    ]
    marker = "inverse dynamics update 0:" if phase == "inverse" else "translator update 0:"
    code, out = signal_after(cmd, marker, tmp_path / "log.txt", sig)
    run = run_dir_of(runs)
    assert (
        code == 1 and "Traceback" not in out and f"interrupted ({signal.Signals(sig).name})" in out
    )
    assert (
        f"python rgdt.py --resume {run}" in out
        and f"--checkpoint {run / 'model.pt'} --updates 0`" in out
    )
    saved = torch.load(run / "model.pt", weights_only=True)
    assert (
        saved["resume"]["progress"]["phase"] == phase
        and 0 < saved["resume"]["updates_done"] < 1_000_000
    )
    t, i = saved["trained_updates"], saved["trained_inv_updates"]
    assert f"holds translator {t}, inverse dynamics {i} updates;" in out
    # said once, on one stream
    assert out.count(f"translator {t}, inverse dynamics {i} updates") == 1


def test_a_run_that_trained_on_from_a_checkpoint_resumes(tmp_path, hdf5_path, monkeypatch):
    parent = rgdt.train(
        tiny(tmp_path / "parent", hdf5_path, updates=4, inv_updates=4, eval_every=0)
    )
    ck = str(Path(parent["run_dir"]) / "model.pt")
    on = dict(checkpoint=ck, updates=6, inv_updates=6, eval_every=3)
    whole = rgdt.train(tiny(tmp_path / "whole", hdf5_path, **on))
    with monkeypatch.context() as m:
        signal_on_call(rgdt, m, "update", 4)
        with pytest.raises(SystemExit, match="holds translator 8, inverse dynamics 10 updates"):
            rgdt.train(tiny(tmp_path / "stopped", hdf5_path, **on))
    resumed = rgdt.train(rgdt.Args(resume=str(run_dir_of(tmp_path / "stopped"))))
    assert_same_run(resumed, whole)
    assert (resumed["updates"], resumed["trained_updates"], resumed["trained_inv_updates"]) == (
        6,
        10,
        10,
    )


def test_resume_refuses_what_it_cannot_continue(tmp_path, hdf5_path, monkeypatch):
    with pytest.raises(SystemExit, match="no run of rgdt.py there"):
        rgdt.train(rgdt.Args(resume=str(tmp_path / "nothing")))
    finished = Path(
        rgdt.train(tiny(tmp_path / "f", hdf5_path, updates=4, inv_updates=2, eval_every=0))[
            "run_dir"
        ]
    )
    with pytest.raises(SystemExit, match="that run has finished"):
        rgdt.train(rgdt.Args(resume=str(finished)))
    with monkeypatch.context() as m:
        signal_on_call(rgdt, m, "update", 2)
        with pytest.raises(SystemExit, match="interrupted"):
            rgdt.train(tiny(tmp_path / "s", hdf5_path, updates=4, inv_updates=2, eval_every=0))
    stopped = run_dir_of(tmp_path / "s")
    with pytest.raises(
        SystemExit, match=r"continues that run with its own flags; leave out --inv-lr 0.5 \(the run"
    ):
        rgdt.train(rgdt.Args(resume=str(stopped), inv_lr=0.5))
    with pytest.raises(SystemExit, match=r"leave out --checkpoint .*model.pt \(the run has None\)"):
        rgdt.train(rgdt.Args(resume=str(stopped), checkpoint=str(finished / "model.pt")))
    old = torch.load(stopped / "model.pt", weights_only=True)
    # an older version's model.pt
    torch.save({k: v for k, v in old.items() if k != "resume"}, stopped / "model.pt")
    with pytest.raises(SystemExit, match="holds no training state"):
        rgdt.train(rgdt.Args(resume=str(stopped)))
    torch.save(old, stopped / "model.pt")
    # where and how to run may change
    res = rgdt.train(rgdt.Args(resume=str(stopped), threads=1, device="cpu"))
    assert (res["trained_updates"], res["trained_inv_updates"]) == (4, 2)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((stopped / "config.json").read_text())
    with pytest.raises(SystemExit, match="no model.pt there yet"):
        rgdt.train(rgdt.Args(resume=str(tmp_path / "bare")))


def test_the_decoder_only_state_predictor_resumes_too(tmp_path, hdf5_path, monkeypatch):
    gpt = dict(arch="gpt", full_context_loss=True, updates=6, inv_updates=4, eval_every=3)
    whole = rgdt.train(tiny(tmp_path / "whole", hdf5_path, **gpt))
    with monkeypatch.context() as m:
        signal_on_call(rgdt, m, "update", 4)
        with pytest.raises(SystemExit, match="holds translator 4, inverse dynamics 4 updates"):
            rgdt.train(tiny(tmp_path / "stopped", hdf5_path, **gpt))
    assert_same_run(rgdt.train(rgdt.Args(resume=str(run_dir_of(tmp_path / "stopped")))), whole)
