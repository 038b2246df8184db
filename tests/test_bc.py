"""benchmarks/bc.py: BC and X%BC (Table 1.3's BC / 10% BC columns, Table 2.1's 10% BC) on the method files' data."""

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bc  # noqa: E402
import common  # noqa: E402


def tiny_args(tmp_path, hdf5_path, **kw) -> bc.Args:
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), runs_dir=str(tmp_path / "runs"), hidden=(16, 16),
                batch_size=32, updates=30, eval_episodes=2, eval_every=10, log_every=5, threads=1)  # fmt: skip
    return bc.Args(**(base | kw))


def episodes_with(returns, lengths) -> list[dict]:
    """Episodes whose rewards sum to `returns`, of the given lengths."""
    return [
        dict(rewards=np.full(n, r / n, np.float32), observations=np.zeros((n, 1)), actions=np.zeros((n, 1)))
        for r, n in zip(returns, lengths)
    ]


def test_top_trajectories_are_corls_rule():
    """CORL's any_percent_bc: the best max(1, floor(X% of the trajectories)), by return, best first."""
    eps = episodes_with([5.0, 50.0, 20.0, 40.0, 10.0, 30.0, 1.0, 2.0, 3.0, 4.0, 60.0], [10] * 11)
    assert bc.keep_best(eps, 100, "trajectories").tolist() == [10, 1, 3, 5, 2, 4, 0, 9, 8, 7, 6]
    assert bc.keep_best(eps, 10, "trajectories").tolist() == [10]  # floor(1.1) = 1
    assert bc.keep_best(eps, 30, "trajectories").tolist() == [10, 1, 3]  # floor(3.3) = 3
    assert bc.keep_best(eps, 1, "trajectories").tolist() == [10]  # never empty


def test_top_timesteps_are_the_dt_papers_rule():
    """The DT paper's %BC: whole trajectories, best first, while their steps stay within X% of all steps."""
    eps = episodes_with([100.0, 90.0, 80.0, 10.0], [30, 50, 10, 10])  # 100 steps in all
    assert bc.keep_best(eps, 30, "timesteps").tolist() == [0]  # 30 steps; the next would make 80
    assert bc.keep_best(eps, 80, "timesteps").tolist() == [0, 1]
    assert bc.keep_best(eps, 90, "timesteps").tolist() == [0, 1, 2]
    assert bc.keep_best(eps, 10, "timesteps").tolist() == [0]  # the best one even when it alone is more than X%


def test_states_are_normalised_with_the_kept_data_only():
    eps = [dict(observations=np.full((4, 2), v, np.float32), actions=np.full((4, 1), v / 10, np.float32),
                rewards=np.ones(4, np.float32)) for v in (1.0, 3.0, 100.0)]  # fmt: skip
    data = bc.make_dataset(eps, np.array([1, 0]), True, "cpu")
    mean, std = data["state_stats"]
    assert mean.tolist() == [2.0, 2.0] and std == pytest.approx([1.001, 1.001])  # CORL's eps 1e-3, no 100s
    assert data["states"].shape == (8, 2) and data["states"][:4].flatten().tolist() == pytest.approx([1 / 1.001] * 8)
    assert data["actions"][:4].flatten().tolist() == pytest.approx([0.3] * 4)  # episode 1 (the best) first
    raw = bc.make_dataset(eps, np.array([2]), False, "cpu")
    assert raw["states"].max().item() == 100.0 and raw["state_stats"][1].tolist() == [1.0, 1.0]


def test_bc_regresses_the_demonstrators_actions():
    """On states labelled by a fixed tanh-linear demonstrator, the MLP's MSE falls far below the actions'
    variance, and the tanh output stays inside the action box."""
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
    """All episodes at once in a vector env score exactly as each episode alone with its own seed."""
    import gymnasium as gym

    _, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    torch.manual_seed(0)
    policy = bc.MLPPolicy(11, 3, (16,), [1.0, 1.0, 1.0])
    stats = (np.zeros(11, np.float32), np.full(11, 2.0, np.float32))
    args = bc.Args(eval_episodes=3, seed=4)
    res = bc.evaluate(policy, info, stats, args, torch.device("cpu"))
    for i in range(3):
        env = gym.make("Hopper-v4")
        obs, _ = env.reset(seed=args.seed + 10_000 + i)  # gymnasium seeds vector slot i with seed + i
        total, steps, done = 0.0, 0, False
        while not done:
            with torch.no_grad():
                a = policy(torch.as_tensor(obs, dtype=torch.float32) / 2.0).numpy()
            obs, r, term, trunc, _ = env.step(a)
            total, steps, done = total + r, steps + 1, term or trunc
        assert res["returns"][i] == pytest.approx(total) and res["lengths"][i] == steps
    assert res["normalized_mean"] == pytest.approx(common.normalized_score(info, res["returns"]).mean())


def test_end_to_end_run_folder_has_the_method_files_layout(tmp_path, hdf5_path):
    res = bc.train(tiny_args(tmp_path, hdf5_path, top_pct=10, exp_name="bc-10"))
    run = Path(res["run_dir"])
    saved = json.loads((run / "results.json").read_text())
    for key in ("normalized_mean", "normalized_std", "returns", "lengths", "dataset", "args", "updates",
                "trained_updates", "device", "git_commit", "wall_time_s"):  # fmt: skip
        assert key in saved, key
    assert saved["method"] == "bc" and saved["args"]["exp_name"] == "bc-10" and saved["args"]["top_pct"] == 10
    assert saved["updates"] == saved["trained_updates"] == 30 and saved["dataset"]["source"] == "file"
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


@pytest.mark.parametrize("bad, message", [
    (dict(top_pct=0.0), "--top-pct 0.0: must be in (0, 100]"),
    (dict(top_pct=101.0), "--top-pct 101.0: must be in (0, 100]"),
    (dict(top_pct=float("nan")), "--top-pct nan: must be in (0, 100]"),
    (dict(hidden=(16, 0)), "--hidden 16 0: every width must be > 0"),
    (dict(lr=0.0), "--lr 0.0: must be > 0"),
    (dict(updates=0), "--updates 0: must be > 0"),
    (dict(batch_size=-1), "--batch-size -1: must be > 0"),
    (dict(eval_every=-1), "--eval-every -1: must be >= 0"),
])  # fmt: skip
def test_bad_flags_name_the_flag_and_its_value(tmp_path, hdf5_path, bad, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(".", r"\.").replace("[", r"\[")):
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
        [sys.executable, "benchmarks/bc.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(out.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    tree = ast.parse((ROOT / "benchmarks" / "bc.py").read_text())
    args_class = next(n for n in tree.body if getattr(n, "name", "") == "Args")
    docs = {
        a.target.id: b.value.value
        for a, b in zip(args_class.body, args_class.body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value.value, str)
    }
    assert set(docs) == {f.name for f in dataclasses.fields(bc.Args)}, "a field without a docstring"
    for name, doc in docs.items():
        assert "--" + name.replace("_", "-") in flat and " ".join(doc.split()) in flat, name


def test_defaults_are_corls_any_percent_bc():
    a = bc.Args()
    assert (a.hidden, a.lr, a.batch_size, a.updates, a.normalize_states) == ((256, 256), 3e-4, 256, 10**6, True)
    assert (a.top_pct, a.select, a.eval_episodes) == (100.0, "trajectories", 10)
    assert bc.thesis_column(bc.Args(top_pct=10))[1]["hopper-medium-replay"] == 75.9  # Table 1.3, 10% BC
    assert bc.thesis_column(bc.Args())[1]["hopper-medium-replay"] == 18.1  # Table 1.3, BC
