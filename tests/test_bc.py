"""benchmarks/bc.py: BC and X%BC (Table 1.3's BC / 10% BC columns, Table 2.1's 10% BC) on the method
files' data."""

import ast
import dataclasses
import json
import random
import shutil
import signal
import subprocess
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bc  # noqa: E402
import common  # noqa: E402


def tiny_args(tmp_path, hdf5_path, **kw) -> bc.Args:
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),),
                runs_dir=str(tmp_path / "runs"), hidden=(16, 16), batch_size=32, updates=30,
                eval_episodes=2, eval_every=10, log_every=5, threads=1)  # fmt: skip
    return bc.Args(**(base | kw))


def episodes_with(returns, lengths) -> list[dict]:
    """Episodes whose rewards sum to `returns`, of the given lengths."""
    return [
        dict(
            rewards=np.full(n, r / n, np.float32),
            observations=np.zeros((n, 1)),
            actions=np.zeros((n, 1)),
        )
        for r, n in zip(returns, lengths)
    ]


def test_top_trajectories_are_corls_rule():
    """CORL's any_percent_bc: the best max(1, floor(X% of the trajectories)), by return, best
    first."""
    eps = episodes_with([5.0, 50.0, 20.0, 40.0, 10.0, 30.0, 1.0, 2.0, 3.0, 4.0, 60.0], [10] * 11)
    assert bc.keep_best(eps, 100, "trajectories").tolist() == [10, 1, 3, 5, 2, 4, 0, 9, 8, 7, 6]
    assert bc.keep_best(eps, 10, "trajectories").tolist() == [10]  # floor(1.1) = 1
    assert bc.keep_best(eps, 30, "trajectories").tolist() == [10, 1, 3]  # floor(3.3) = 3
    assert bc.keep_best(eps, 1, "trajectories").tolist() == [10]  # never empty


def test_top_timesteps_are_the_dt_papers_rule():
    """The DT paper's %BC: whole trajectories, best first, while their steps stay within X% of all
    steps."""
    eps = episodes_with([100.0, 90.0, 80.0, 10.0], [30, 50, 10, 10])  # 100 steps in all
    assert bc.keep_best(eps, 30, "timesteps").tolist() == [0]  # 30 steps; the next would make 80
    assert bc.keep_best(eps, 80, "timesteps").tolist() == [0, 1]
    assert bc.keep_best(eps, 90, "timesteps").tolist() == [0, 1, 2]
    # the best one even when it alone is more than X%
    assert bc.keep_best(eps, 10, "timesteps").tolist() == [0]


def test_states_are_normalised_with_the_kept_data_only():
    eps = [dict(observations=np.full((4, 2), v, np.float32),
                actions=np.full((4, 1), v / 10, np.float32),
                rewards=np.ones(4, np.float32)) for v in (1.0, 3.0, 100.0)]  # fmt: skip
    data = bc.make_dataset(eps, np.array([1, 0]), True, "cpu")
    mean, std = data["state_stats"]
    # CORL's eps 1e-3, no 100s
    assert mean.tolist() == [2.0, 2.0] and std == pytest.approx([1.001, 1.001])
    assert data["states"].shape == (8, 2) and data["states"][
        :4
    ].flatten().tolist() == pytest.approx([1 / 1.001] * 8)
    # episode 1 (the best) first
    assert data["actions"][:4].flatten().tolist() == pytest.approx([0.3] * 4)
    raw = bc.make_dataset(eps, np.array([2]), False, "cpu")
    assert raw["states"].max().item() == 100.0 and raw["state_stats"][1].tolist() == [1.0, 1.0]


def test_bc_regresses_the_demonstrators_actions():
    """On states labelled by a fixed tanh-linear demonstrator, the MLP's MSE falls far below the
    actions' variance, and the tanh output stays inside the action box."""
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(2048, 5, generator=gen)
    actions = torch.tanh(states @ torch.randn(5, 2, generator=gen))
    data = {"states": states, "actions": actions}
    policy = bc.MLPPolicy(5, 2, (64, 64), [1.0, 1.0])
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = [bc.update(policy, opt, data, 128, gen).item() for _ in range(200)]
    assert np.mean(losses[-20:]) < 0.01 * actions.var().item(), (losses[0], losses[-1])
    out = bc.MLPPolicy(5, 2, (8,), [0.5, 2.0])(100 * states)
    assert (out.abs() <= torch.tensor([0.5, 2.0]) + 1e-6).all() and out[:, 1].abs().max() > 1.0


def test_vector_evaluation_equals_episodes_run_one_by_one(hdf5_path):
    """All episodes at once in a vector env score exactly as each episode alone with its own
    seed."""
    import gymnasium as gym

    _, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    torch.manual_seed(0)
    policy = bc.MLPPolicy(11, 3, (16,), [1.0, 1.0, 1.0])
    stats = (np.zeros(11, np.float32), np.full(11, 2.0, np.float32))
    args = bc.Args(eval_episodes=3, seed=4)
    res = bc.evaluate(policy, info, stats, args, torch.device("cpu"))
    for i in range(3):
        env = gym.make("Hopper-v4")
        # gymnasium seeds vector slot i with seed + i
        obs, _ = env.reset(seed=args.seed + 10_000 + i)
        total, steps, done = 0.0, 0, False
        while not done:
            with torch.no_grad():
                a = policy(torch.as_tensor(obs, dtype=torch.float32) / 2.0).numpy()
            obs, r, term, trunc, _ = env.step(a)
            total, steps, done = total + r, steps + 1, term or trunc
        assert res["returns"][i] == pytest.approx(total) and res["lengths"][i] == steps
    assert res["normalized_mean"] == pytest.approx(
        common.normalized_score(info, res["returns"]).mean()
    )


def test_end_to_end_run_folder_has_the_method_files_layout(tmp_path, hdf5_path):
    res = bc.train(tiny_args(tmp_path, hdf5_path, top_pct=10, exp_name="bc-10"))
    run = Path(res["run_dir"])
    saved = json.loads((run / "results.json").read_text())
    for key in ("normalized_mean", "normalized_std", "returns", "lengths", "dataset", "args",
                "updates", "trained_updates", "device", "git_commit", "wall_time_s"):  # fmt: skip
        assert key in saved, key
    assert (
        saved["method"] == "bc"
        and saved["args"]["exp_name"] == "bc-10"
        and saved["args"]["top_pct"] == 10
    )
    assert (
        saved["updates"] == saved["trained_updates"] == 30 and saved["dataset"]["source"] == "file"
    )
    assert len(saved["returns"]) == 2 and saved["normalized_mean"] == pytest.approx(
        common.normalized_score(saved["dataset"], saved["returns"]).mean()
    )
    episodes, _ = common.load_dataset("hopper-random", (str(hdf5_path),))
    keep = bc.keep_best(episodes, 10, "trajectories")
    assert saved["kept"]["episodes"] == len(keep) == max(1, len(episodes) // 10)
    assert saved["kept"]["transitions"] == sum(len(episodes[i]["rewards"]) for i in keep)
    assert saved["kept"]["return_min"] >= np.median([ep["rewards"].sum() for ep in episodes])
    config = json.loads((run / "config.json").read_text())
    assert config["args"] == saved["args"] and config["arch"]["hidden"] == [16, 16]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "eval_normalized" in m] == [0, 10, 20, 30]
    assert [m["step"] for m in lines if "loss" in m] == [0, 5, 10, 15, 20, 25, 29]
    assert lines[-1]["eval_normalized"] == pytest.approx(saved["normalized_mean"])
    ckpt = torch.load(run / "model.pt", weights_only=True)  # plain tensors and dicts: loads as data
    policy = bc.MLPPolicy(**ckpt["arch"])
    policy.load_state_dict(ckpt["model"])
    assert ckpt["method"] == "bc" and ckpt["trained_updates"] == 30
    assert ckpt["state_mean"].shape == (11,) and (ckpt["state_std"] > 0).all()


def test_same_seed_same_run(tmp_path, hdf5_path):
    a = bc.train(tiny_args(tmp_path / "a", hdf5_path, eval_every=0))
    b = bc.train(tiny_args(tmp_path / "b", hdf5_path, eval_every=0))
    c = bc.train(tiny_args(tmp_path / "c", hdf5_path, eval_every=0, seed=1))
    assert a["returns"] == b["returns"] and a["returns"] != c["returns"]


# fmt: skip
@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(top_pct=0.0), "--top-pct 0.0: must be in (0, 100]"),
        (dict(top_pct=101.0), "--top-pct 101.0: must be in (0, 100]"),
        (dict(top_pct=float("nan")), "--top-pct nan: must be in (0, 100]"),
        (dict(hidden=(16, 0)), "--hidden 16 0: every width must be > 0"),
        (dict(lr=0.0), "--lr 0.0: must be > 0"),
        (dict(updates=0), "--updates 0: must be > 0"),
        (dict(batch_size=-1), "--batch-size -1: must be > 0"),
        (dict(eval_every=-1), "--eval-every -1: must be >= 0"),
    ],
)
def test_bad_flags_name_the_flag_and_its_value(tmp_path, hdf5_path, bad, message):
    with pytest.raises(
        SystemExit, match=message.replace("(", r"\(").replace(".", r"\.").replace("[", r"\[")
    ):
        tiny_args(tmp_path, hdf5_path, **bad)


def test_bad_data_is_a_clear_error_and_leaves_no_run_folder(tmp_path, hdf5_path):
    with pytest.raises(SystemExit, match="unknown dataset 'hopper-mediun'"):
        bc.train(tiny_args(tmp_path, hdf5_path, env="hopper-mediun"))
    with pytest.raises(SystemExit, match="no such file"):
        bc.train(tiny_args(tmp_path, hdf5_path, dataset_path=(str(tmp_path / "none.hdf5"),)))
    assert not (tmp_path / "runs").exists()


def test_cli_help_explains_every_flag():
    """Every Args field has a docstring, and --help shows each one in full next to its flag."""
    out = subprocess.run(
        [sys.executable, "benchmarks/bc.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(out.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    tree = ast.parse((ROOT / "benchmarks" / "bc.py").read_text())
    args_class = next(n for n in tree.body if getattr(n, "name", "") == "Args")
    docs = {
        a.target.id: b.value.value
        for a, b in zip(args_class.body, args_class.body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(b.value.value, str)
    }
    assert set(docs) == {f.name for f in dataclasses.fields(bc.Args)}, "a field without a docstring"
    for name, doc in docs.items():
        assert "--" + name.replace("_", "-") in flat and " ".join(doc.split()) in flat, name


def test_defaults_are_corls_any_percent_bc():
    a = bc.Args()
    assert (a.hidden, a.lr, a.batch_size, a.updates, a.normalize_states) == (
        (256, 256),
        3e-4,
        256,
        10**6,
        True,
    )
    assert (a.top_pct, a.select, a.eval_episodes) == (100.0, "trajectories", 10)
    # Table 1.3, 10% BC
    assert bc.thesis_column(bc.Args(top_pct=10))[1]["hopper-medium-replay"] == 75.9
    assert bc.thesis_column(bc.Args())[1]["hopper-medium-replay"] == 18.1  # Table 1.3, BC


# --- Runs that survive (issue 24): dt.py's resume design, ported; tests/resume_check.py's checks.
# at an evaluation (its score not yet logged), and between two
@pytest.mark.parametrize("stop_at", [10, 7])
def test_stopped_by_sigterm_and_resumed_equals_the_uninterrupted_run(
    tmp_path, hdf5_path, monkeypatch, stop_at
):
    whole = bc.train(tiny_args(tmp_path / "whole", hdf5_path))
    with monkeypatch.context() as m:
        signal_on_call(bc, m, "update", stop_at)
        with pytest.raises(
            SystemExit, match=rf"interrupted \(SIGTERM\): .*holds {stop_at} updates; continue with "
        ):
            bc.train(tiny_args(tmp_path / "stopped", hdf5_path))
    run = run_dir_of(tmp_path / "stopped" / "runs")
    assert torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"] == stop_at
    assert not (run / "results.json").exists()
    resumed = bc.train(bc.Args(resume=str(run)))
    assert (
        resumed["run_dir"] == str(run) and json.loads((run / "config.json").read_text())["resumed"]
    )
    # metrics, returns and weights bit for bit (fp32 MLP, deterministic on CPU)
    assert_same_run(resumed, whole)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the run put the handlers back


def test_stopped_during_an_evaluation_resumes_with_that_evaluation(
    tmp_path, hdf5_path, monkeypatch
):
    whole = bc.train(tiny_args(tmp_path / "whole", hdf5_path))
    real, calls = bc.evaluate, {"n": 0}

    def stopped_in_the_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("SIGUSR1")
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(bc, "evaluate", stopped_in_the_second)
        with pytest.raises(SystemExit, match=r"interrupted \(SIGUSR1\): .*holds 10 updates"):
            bc.train(tiny_args(tmp_path / "stopped", hdf5_path))
    assert_same_run(bc.train(bc.Args(resume=str(run_dir_of(tmp_path / "stopped" / "runs")))), whole)


def test_evaluation_leaves_the_training_random_streams_alone(hdf5_path):
    """An evaluation between two updates must not move a random state the training draws from."""
    _, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    policy = bc.MLPPolicy(11, 3, (8,), [1.0, 1.0, 1.0])
    stats = (np.zeros(11, np.float32), np.ones(11, np.float32))
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    bc.evaluate(policy, info, stats, bc.Args(eval_episodes=2), torch.device("cpu"))
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert (
        before[0] == after[0] and (before[1] == after[1]).all() and torch.equal(before[2], after[2])
    )


def test_checkpoints_are_periodic_and_atomic(tmp_path, hdf5_path, monkeypatch):
    saved = []
    real = bc.save_atomic
    monkeypatch.setattr(
        bc,
        "save_atomic",
        lambda obj, path: saved.append(obj["resume"]["updates_done"]) or real(obj, path),
    )
    bc.train(tiny_args(tmp_path / "a", hdf5_path, eval_every=0))
    # every 10% of the run without evaluations
    assert saved == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    saved.clear()
    bc.train(tiny_args(tmp_path / "b", hdf5_path, updates=20, eval_every=10))
    assert saved == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]  # every evaluation (10, 20) and every 10%
    saved.clear()
    bc.train(tiny_args(tmp_path / "c", hdf5_path, updates=20, save_every=7))
    assert saved == [7, 14, 20]
    ckpt = torch.load(next((tmp_path / "c" / "runs").iterdir()) / "model.pt", weights_only=True)
    assert {
        "model",
        "arch",
        "args",
        "dataset",
        "trained_updates",
        "state_mean",
        "state_std",
    } <= set(ckpt)


def test_a_kill_during_a_save_leaves_the_last_checkpoint_and_resume_succeeds(
    tmp_path, hdf5_path, monkeypatch
):
    # the slowed script imports bc by name
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "benchmarks"))
    argv = ["--env", "hopper-random", "--dataset-path", str(hdf5_path),
            "--runs-dir", str(tmp_path / "runs"), "--updates", "20", "--batch-size", "8",
            "--hidden", "16", "--eval-every", "0", "--save-every", "5", "--eval-episodes", "1",
            "--threads", "1"]  # fmt: skip
    # killed while writing the checkpoint of update 10
    run = kill_during_save("bc", argv, tmp_path, n=2)
    assert (run / "model.pt.tmp").read_bytes().startswith(b"half")
    assert torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"] == 5
    res = bc.train(bc.Args(resume=str(run)))
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
    cmd = [sys.executable, "benchmarks/bc.py", "--env", "hopper-random",
           "--dataset-path", str(hdf5_path),
           "--runs-dir", str(runs), "--updates", "100000000", "--batch-size", "4", "--hidden", "8",
           "--eval-episodes", "1", "--eval-every", "100000000", "--threads", "1"]  # fmt: skip
    code, out = signal_after(cmd, "update 0:", tmp_path / "log.txt", sig)
    run = run_dir_of(runs)
    name = signal.Signals(sig).name
    assert code == 1 and "Traceback" not in out and f"interrupted ({name})" in out
    assert f"python benchmarks/bc.py --resume {run}" in out
    done = torch.load(run / "model.pt", weights_only=True)["resume"]["updates_done"]
    assert 0 < done < 100_000_000 and f"holds {done} updates" in out


def test_resume_refuses_what_it_cannot_continue(tmp_path, hdf5_path, monkeypatch):
    with pytest.raises(SystemExit, match="no run of benchmarks/bc.py there"):
        bc.train(bc.Args(resume=str(tmp_path / "nothing")))
    finished = Path(
        bc.train(tiny_args(tmp_path / "f", hdf5_path, updates=4, eval_every=0))["run_dir"]
    )
    with pytest.raises(SystemExit, match="that run has finished"):
        bc.train(bc.Args(resume=str(finished)))
    with monkeypatch.context() as m:
        signal_on_call(bc, m, "update", 2)
        with pytest.raises(SystemExit, match="interrupted"):
            bc.train(tiny_args(tmp_path / "s", hdf5_path, updates=4, eval_every=0))
    stopped = run_dir_of(tmp_path / "s" / "runs")
    with pytest.raises(
        SystemExit, match=r"continues that run with its own flags; leave out --lr 0.5 \(the run has"
    ):
        bc.train(bc.Args(resume=str(stopped), lr=0.5))
    broken = Path(shutil.copytree(stopped, tmp_path / "broken"))
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="its model.pt is not a checkpoint torch can read as data"):
        bc.train(bc.Args(resume=str(broken)))
    (broken / "model.pt").unlink()
    with pytest.raises(SystemExit, match="no model.pt there yet"):
        bc.train(bc.Args(resume=str(broken)))
    # where and how to run may change
    res = bc.train(bc.Args(resume=str(stopped), threads=1, device="cpu"))
    assert res["trained_updates"] == 4


def test_no_workspace_paths_in_bc_and_run():
    """A clone has no ../shared: docstrings, help and hints name a folder of hdf5 files instead
    (issue 25)."""
    for script in ("benchmarks/bc.py", "benchmarks/run.py"):
        assert "../shared" not in (ROOT / script).read_text(), script


def test_bc_trains_in_fp32_on_every_machine(tmp_path, hdf5_path, monkeypatch):
    """BC's MLP has no bf16 path, even where the method files take it (a bf16-native CPU, a GPU, the
    suite's forced-bf16 pass): its exact checks above need no bf16 tolerance, and its records say
    fp32."""
    monkeypatch.setenv("SEQRL_TEST_FORCE_BF16", "1")
    res = bc.train(tiny_args(tmp_path, hdf5_path, updates=4, eval_every=0))
    assert (
        res["bf16"] is False
        and json.loads((Path(res["run_dir"]) / "config.json").read_text())["bf16"] is False
    )
    ckpt = torch.load(Path(res["run_dir"]) / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())


def test_a_batch_or_eval_episodes_too_large_for_memory_is_refused_before_the_run_folder(
    tmp_path, hdf5_path, monkeypatch
):
    """Issue 25: with 1 GB free (faked), --batch-size 10^6 (hidden 16 16 needs 64 + 11 + 3 values a
    sample: 0.3 GB, passes) and 10^7 (3.1 GB) and --eval-episodes 10^4 (11 GB of envs) get one
    line naming the flag, its value and a value that fits; no run folder is made."""
    monkeypatch.setattr(common, "available_memory", lambda device: 1_000_000_000)
    with pytest.raises(SystemExit) as refused:
        bc.train(tiny_args(tmp_path, hdf5_path, batch_size=10**7))
    assert str(refused.value) == (
        "error: --batch-size 10000000: a training update needs about 3.1 GB, more than the 1.0 GB "
        "of memory available on cpu; lower --batch-size (about 3205128 fits) or free memory."
    )
    with pytest.raises(
        SystemExit, match=r"^error: --eval-episodes 10000: an evaluation needs about 11\.0 GB"
    ):
        bc.train(tiny_args(tmp_path, hdf5_path, eval_episodes=10**4))
    assert not (tmp_path / "runs").exists()
    bc.check_memory_flags(tiny_args(tmp_path, hdf5_path, batch_size=10**6), dict(state_dim=11,
                                    act_dim=3, hidden=[16, 16]), torch.device("cpu"))  # fmt: skip


def test_out_of_memory_in_the_first_evaluation_is_one_line_and_leaves_no_run_folder(
    tmp_path, hdf5_path, monkeypatch
):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bc, "evaluate", oom)
    with pytest.raises(SystemExit) as caught:
        bc.train(tiny_args(tmp_path, hdf5_path))
    line = str(caught.value)
    assert line.startswith(
        "error: --eval-episodes 2: out of memory on cpu in an evaluation; lower "
    )
    assert line.endswith(" held nothing yet and is removed.") and "\n" not in line
    assert list((tmp_path / "runs").iterdir()) == []  # the run folder, config.json only, is gone


def test_the_training_clock_synchronizes_at_pauses_never_per_update(
    tmp_path, hdf5_path, monkeypatch
):
    """Issue 28 item 4: the device is synchronized when an interval of updates closes (a log line,
    an evaluation, a save), here at updates 1, 11, 21 (log lines) and 30 (log, save), not 30
    times."""
    synced = []
    monkeypatch.setattr(bc, "synchronize", lambda device: synced.append(device))
    args = tiny_args(tmp_path, hdf5_path, updates=30, log_every=10, eval_every=0, save_every=30)
    res = bc.train(args)
    assert len(synced) == 4 and res["train_updates_per_s"] > 0
