import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import tt_analysis  # noqa: E402


def test_map_metrics_on_hand_made_maps():
    """3 steps of 2 tokens. A map that only looks at its own token is all 'local' and has no far mass; a map that
    sends everything to token 0 (a return token) is one vertical stripe on a return token."""
    T = 6
    step, ret = np.arange(T) // 2, np.arange(T) % 2 == 0
    allowed = np.tril(np.ones((T, T), bool))
    diag = np.eye(T)[None]
    stripe = np.zeros((1, T, T))
    stripe[0, :, 0] = 1
    m = tt_analysis.map_metrics(np.concatenate([diag, stripe]), allowed, step, ret)
    assert m["local"][0] == pytest.approx(1.0) and m["return_far_share"][0] == 0.0
    assert m["local"][1] == pytest.approx(4 / 6)  # rows of steps 0 and 1 reach token 0 within 1 step
    assert m["return_far_share"][1] == pytest.approx(1.0) and m["stripe"][1] == pytest.approx(1.0)
    assert m["return_share_uniform"] == pytest.approx(1 / 2)  # far keys of rows 4, 5: tokens 0, 1 (one return)


def test_row_stats_gini_entropy_and_allocation():
    """One layer, two heads, one row over 4 allowed keys: head 0 uniform (Gini 0, entropy ln 4), head 1 one-hot
    on the current step's return token (Gini 3/4, entropy 0). Keys are 2 steps x 2 tokens, query at step 1."""
    s = tt_analysis.RowStats(n_layer=1, n_head=2, max_dist=1)
    att = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]])[None, :, None, :]  # (N=1, H=2, Q=1, T=4)
    key_step, ret = torch.tensor([0, 0, 1, 1]), torch.tensor([True, False, True, False])
    s.add(0, [att], torch.ones(1, 4, dtype=torch.bool), key_step, 1, ret)
    out = s.summary()
    assert out["gini"][0] == pytest.approx((0 + 0.75) / 2)
    np.testing.assert_allclose(out["entropy"][0], [math.log(4), 0.0], atol=1e-6)
    np.testing.assert_allclose(out["entropy_normalized"][0], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out["alloc"][0], [(0.5 + 1) / 2, (0.5 + 0) / 2, 0.0])  # return / recent / old
    np.testing.assert_allclose(out["mass_by_distance"], [(0.5 + 1) / 2, (0.5 + 0) / 2])
    np.testing.assert_allclose(out["uniform_by_distance"], [0.5, 0.5])


def test_growth_ratio():
    err = np.array([[1.0, 1.0, 2.0, 4.0]])
    assert tt_analysis.growth(err) == pytest.approx(4.0)
    assert tt_analysis.growth(np.ones((3, 40))) == pytest.approx(1.0)


def test_verdicts():
    assert tt_analysis.verdict([True, True]) == "holds"
    assert tt_analysis.verdict([True, False]) == "partly"
    assert tt_analysis.verdict([False]) == "does not hold"


def test_bad_flags_and_missing_data(tmp_path):
    with pytest.raises(SystemExit, match="--error-steps 0"):
        tt_analysis.Args(error_steps=0)
    with pytest.raises(SystemExit, match="--data-dir .*: no hopper-medium-replay.hdf5 there"):
        tt_analysis.main(tt_analysis.Args(data_dir=str(tmp_path), out=str(tmp_path / "out")))
    with pytest.raises(SystemExit, match="--dataset-path .*none.hdf5: no such file"):
        tt_analysis.main(tt_analysis.Args(dataset_path=str(tmp_path / "none.hdf5"), out=str(tmp_path / "out")))
    with pytest.raises(SystemExit, match="pass one of them"):
        tt_analysis.Args(data_dir=str(tmp_path), dataset_path=str(tmp_path / "x.hdf5"))
    assert not (tmp_path / "out").exists()
    assert tt_analysis.Args().data_dir is None and tt_analysis.Args().out is None  # no workspace path by default


def test_all_nine_analyses_on_a_tiny_budget(tmp_path, hdf5_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(hdf5_path, data / "hopper-random.hdf5")
    args = tt_analysis.Args(env="hopper-random", data_dir=str(data), out=str(tmp_path / "out"),
                            runs_dir=str(tmp_path / "runs"), dt_updates=2, tt_updates=2, beam_width=2, horizon=1,
                            eval_episodes=2, eval_max_steps=6, error_episodes=2, error_steps=4, windows=2,
                            beam_widths=(1, 2, 3), cost_reps=1, paper_speed=False)  # fmt: skip
    summary = tt_analysis.main(args)
    out = Path(args.out)
    figures = sorted(p.name for p in out.glob("*.png"))
    assert [f[0] for f in figures] == [str(i) for i in range(1, 10)]
    saved = json.loads((out / "summary.json").read_text())
    assert sorted({c["analysis"] for c in saved["claims"]}) == list(range(1, 10))
    assert all(c["verdict"] in ("holds", "partly", "does not hold", "n/a") for c in saved["claims"])
    assert saved["data_label"] == "local file" and saved["scores"]["source"] == "local file"
    modes = {f"{m}_{k}" for m in ("dt", "tt_greedy", "tt_beam") for k in ("self", "teacher")}
    assert set(saved["errors"]["growth"]) == modes
    assert len(saved["errors_mean_per_step"]) == 6 and all(len(v) == 4 for v in saved["errors_mean_per_step"].values())
    assert list(saved["compute_cost"]["tt_s_per_step"]) == ["1", "2", "3"]
    assert saved["tt"]["plan_s_per_step"]["beam"] > 0 and summary["dt"]["updates"] == 2
    printed = capsys.readouterr().out
    assert "blog claim" in printed and "| ours | verdict" in printed
