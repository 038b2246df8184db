"""benchmarks/iem_analysis.py: the claim rules on hand-made maps, and the whole pipeline on a tiny
budget."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import iem_analysis  # noqa: E402


def summary_of(layers, H=4, M=2, past=0.3, future=0.3):
    """An attention summary as iem_analysis.attention_on writes it, from hand-made maps (one
    sample)."""
    T = 1 + M + H
    keys = torch.ones(T, T, dtype=torch.bool)
    spreads = [iem_analysis.row_spread(torch.as_tensor(m), keys) for m in layers]
    return {
        "layers": [m.tolist() for m in layers],
        "labels": [f"k{i}" for i in range(T)],
        "real_tokens": float(T),
        "masked_query_past_mass": [[past] * H] * len(layers),
        "masked_query_future_mass": [[future] * H] * len(layers),
        "row_effective_keys": [n for n, _ in spreads],
        "row_distance_from_uniform": [d for _, d in spreads],
    }


def hand_made(layers, control=None, H=4, **kw):
    """Hand-made maps beside a control (default: uniform maps and uniform masses, a random-init
    IEM's)."""
    T = len(layers[0])
    uni = 1 / T  # a uniform map's mass on each other plan token
    control = control or [np.full((T, T), 1 / T)] * len(layers)
    return {**summary_of(layers, H, **kw), "control": summary_of(control, H, past=uni, future=uni)}


T = 7


def maps():
    band = np.full((T, T), 0.3 / (T - 1))
    band[:, -1] = 0.7  # every query puts 0.7 on the rightmost key: the blog's layer 0
    dual = np.full((T, T), 0.2 / (T - 2))
    dual[:, 2], dual[:, 4] = 0.45, 0.35  # two columns: the blog's middle layer
    grid = np.zeros((T, T))  # a distributed grid: each row spread over 4 keys, the columns balanced
    for i in range(T):
        grid[i, [(i + k) % T for k in range(4)]] = 0.25
    return band, dual, grid


def test_claim_rules_on_hand_made_maps():
    band, dual, grid = maps()
    c = iem_analysis.judge(hand_made([band, dual, grid]), H=4)
    assert [c[k]["verdict"] for k in c] == ["holds"] * 4  # 0.3 on each side, 2.1x the uniform share
    assert (
        "k6 takes 0.70" in c["layer0_band"]["ours"]
        and "largest key 0.14" in c["layer0_band"]["control"]
    )
    uniform = np.full((T, T), 1 / T)
    c = iem_analysis.judge(hand_made([uniform, uniform, band], past=0.0), H=4)
    assert [c[k]["verdict"] for k in c] == ["does not hold"] * 4  # and the rules can say no
    assert all(c[k]["blog"] == iem_analysis.CLAIMS[k][0] for k in c)


def test_a_diagonal_deep_layer_is_no_grid():
    """Its mean row is flat (no dominant column, T effective keys): the old rule, on the mean row,
    said holds."""
    band, dual, _ = maps()
    c = iem_analysis.judge(hand_made([band, dual, np.eye(T)]), H=4)
    assert (
        c["deep_grid"]["verdict"] == "does not hold"
        and "per row 1.0 effective keys" in c["deep_grid"]["ours"]
    )


def test_the_control_decides_what_holds():
    """The same maps hold against a uniform control but not against a control that shows them
    already (the architecture, not training, would then make the pattern), nor without any control.
    """
    band, dual, grid = maps()
    layers = [band, dual, grid]
    same = hand_made(layers, control=layers)
    same["control"] = {**same["control"], "masked_query_past_mass": same["masked_query_past_mass"]}
    same["control"]["masked_query_future_mass"] = same["masked_query_future_mass"]
    c = iem_analysis.judge(same, H=4)
    assert all(c[k]["verdict"] != "holds" for k in c)
    bare = {k: v for k, v in hand_made(layers).items() if k != "control"}
    c = iem_analysis.judge(bare, H=4)
    assert {c[k]["verdict"] for k in c} == {"not decidable at this budget"} and "not recorded" in c[
        "layer0_band"
    ]["control"]


def test_quick_pipeline_writes_summary_and_figures(tmp_path):
    a = iem_analysis.Args(
        quick=True,
        out=str(tmp_path / "out"),
        runs_dir=str(tmp_path / "runs"),
        data_dir=str(tmp_path / "data"),
        attention_states=3,
    )
    s = iem_analysis.main(a)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {
        "summary.json",
        "energy.png",
        "attention.png",
        "success.png",
    }
    saved = json.loads((out / "summary.json").read_text())
    ((level, d),) = saved["levels"].items()
    assert (
        level == "GoToLocalS7N5" and len(d["runs"]) == 1 and s["levels"][level]["mean"] == d["mean"]
    )
    maps = np.array(d["attention"]["layers"])
    T = 1 + d["runs"][0]["arch"]["mission_len"] + d["runs"][0]["arch"]["horizon"]
    assert maps.shape == (3, T, T) and len(d["attention"]["labels"]) == T
    # every row of every layer is a distribution
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert {c["verdict"] for c in d["claims"].values()} <= {
        "holds",
        "not decidable at this budget",
        "does not hold",
    }
    # a random-init model's, on the same plan copies
    control = np.array(d["attention"]["control"]["layers"])
    assert control.shape == maps.shape and not np.allclose(control, maps)
    r = d["runs"][0]
    assert (
        len(r["energy_per_iteration"]) == 3
        and 0 <= r["iem_success"] <= 1
        and r["train_updates_per_s"] > 0
    )
    # LEAP's rule (iem.py's default, --accept all) may raise the energy; only --accept lower never
    # does
    assert np.isfinite(r["energy_per_iteration"]).all() and r["energy_per_iteration"][0] > 0
    again = iem_analysis.main(
        iem_analysis.Args(from_summary=str(out / "summary.json"), out=str(tmp_path / "again"))
    )
    assert (
        again["levels"][level]["claims"] == d["claims"]
        and (tmp_path / "again" / "attention.png").is_file()
    )
    with pytest.raises(SystemExit, match="holds files; .* --force"):
        iem_analysis.main(iem_analysis.Args(from_summary=str(out / "summary.json"), out=str(out)))


def test_titles_fit_their_figures(tmp_path, monkeypatch):
    """One level (--quick) makes narrow figures; every title must still lie inside the figure."""
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    summary = json.loads((ROOT / "benchmarks" / "results" / "iem" / "summary.json").read_text())
    for n in (1, len(summary["levels"])):
        one = {**summary, "levels": dict(list(summary["levels"].items())[:n])}
        iem_analysis.figures(one, tmp_path)
    assert len(drawn) == 6
    for fig in drawn:
        # the closed figure's canvas no longer renders
        renderer = FigureCanvasAgg(fig).get_renderer()
        texts = [fig._suptitle] + [ax.title for ax in fig.axes]
        for t in texts:
            if t is not None and t.get_text():
                box = t.get_window_extent(renderer)
                assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (
                    t.get_text()
                )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
