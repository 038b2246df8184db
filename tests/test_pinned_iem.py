"""iem.py's results on a fixed seed are pinned (issue 29): a tiny fp32 run's first losses, final
scores and energy curve. A change to any of them is a decision to state in the commit message and
to make here, not something that happens unseen."""

import json
from pathlib import Path

import pytest

import iem

LEVEL = "GoToLocalS7N5"
# Measured at 393c6d1 (before issue 29's redesign of iem.py), fp32, one thread.
LOSSES = [2.077499, 2.098758, 2.073134, 1.984099, 2.087233, 2.142219]
# Mean energy of the refined plans after each iteration: it pins the trained weights and the
# planner's random stream (sampled refinement, --temperature 1).
ENERGY = [4.188231, 4.712496, 4.997214, 5.246544]
SCORES = {"iem": (0.0, 0.0), "bc": (0.0, 0.0)}  # (success rate, mean return)
LENGTHS = [49, 49, 49]  # every episode runs to the level's step limit


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pinned")
    iem.collect_demos(LEVEL, 12, tmp / "data" / f"{iem.env_id(LEVEL)}__bot12.npz")
    flags = dict(n_layer=2, n_head=2, n_embd=16, horizon=3, iterations=3, temperature=1.0)
    budget = dict(collect=12, updates=6, batch_size=8, eval_episodes=3, log_every=1)
    where = dict(runs_dir=str(tmp / "runs"), data_dir=str(tmp / "data"), threads=1)
    res = iem.train(iem.Args(env=LEVEL, seed=0, bf16=False, **flags, **budget, **where))
    lines = (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return res, [json.loads(line) for line in lines]


def test_the_first_losses_are_pinned(pinned_run):
    res, lines = pinned_run
    assert res["bf16"] is False
    losses = [m["loss"] for m in lines if "loss" in m]
    assert losses == pytest.approx(LOSSES, abs=2e-6)


def test_the_final_scores_and_energy_curve_are_pinned(pinned_run):
    res, _ = pinned_run
    for k, (success, mean_return) in SCORES.items():
        assert (res[k]["success_rate"], res[k]["return_mean"]) == (success, mean_return)
        assert res[k]["lengths"] == LENGTHS
    assert res["iem"]["energy_per_iteration"] == pytest.approx(ENERGY, abs=2e-6)
