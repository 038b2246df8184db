"""Statistics of the benchmarks (issue 26): claims.ordering_verdict (P(X > Y) with its bootstrap
CI), aggregate.py's CIs, History and figures, curves.py's IQM over seeds; the budget rule."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import aggregate  # noqa: E402
import claims  # noqa: E402
import curves  # noqa: E402
import run  # noqa: E402

REPS = 100  # small: these tests check the rule and the plumbing, not the third digit of a CI
WIN, LOSE = [60.0, 70.0, 80.0, 90.0, 95.0], [1.0, 2.0, 3.0, 4.0, 5.0]


def job(folder: Path, method: str, dataset: str, seed: int, evals, extra=(), code="c", start=1):
    """A benchmarks/run.py job folder: results.json (its final score is the last evaluation) and
    metrics.jsonl; `start` is the run's start time, the end of its run folder's name."""
    cmd = [run.METHODS[method]["script"], "--env", dataset, "--seed", str(seed), *extra]
    folder = folder / f"{method}__{dataset}__s{seed}__{code}__{abs(hash(tuple(cmd))) % 10**8}"
    folder.mkdir(parents=True)
    res = dict(
        method=run.METHODS[method]["script"].split("/")[-1].removesuffix(".py"),
        args=dict(exp_name=method, env=dataset, seed=seed, lambdas=[0.25] * 4, bins=3)
        | (dict(top_pct=10) if method == "bc-10" else {}),
        normalized_mean=evals[-1],
        updates=10,
        device="cpu",
        git_commit=None,
        run_dir=f"runs/{dataset}__{method}__{seed}__{start}",
        dataset=dict(source="replica", name=dataset),
        benchmark=dict(method=method, dataset=dataset, seed=seed, cmd=cmd, code_sha256=code),
    )
    (folder / "results.json").write_text(json.dumps(res))
    lines = [dict(step=100 * i, eval_normalized=v) for i, v in enumerate(evals)]
    lines.append(dict(step=50, loss=0.1))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_a_clear_win_holds_a_clear_loss_does_not_and_a_tie_is_not_decidable():
    assert claims.ordering_verdict(WIN, LOSE, reps=REPS)["verdict"] == "holds"
    assert claims.ordering_verdict(LOSE, WIN, reps=REPS)["verdict"] == "does not hold"
    tie = claims.ordering_verdict(WIN, WIN, reps=REPS)
    assert tie["verdict"] == "not decidable with these seeds" and tie["p"] == 0.5
    assert tie["ci"][0] < 0.5 < tie["ci"][1]
    win = claims.ordering_verdict(WIN, LOSE, reps=REPS)
    assert win["p"] == 1.0 and win["ci"] == (1.0, 1.0) and win["n"] == (5, 5)
    # overlapping seeds: P(X > Y) = 19 / 25 pairs, and five seeds cannot tell
    x, y = [10.0, 30.0, 50.0, 70.0, 90.0], [20.0, 40.0, 60.0, 5.0, 6.0]
    close = claims.ordering_verdict(x, y, reps=REPS)
    assert close["p"] == pytest.approx(0.76)
    assert close["verdict"] == "not decidable with these seeds"


def test_too_few_seeds_are_never_decided_and_the_verdict_is_reproducible():
    """2 vs 2 seeds: even a complete separation happens by chance 1 time in 6; 4 vs 4 is least."""
    few = claims.ordering_verdict([90.0, 95.0], [1.0, 2.0], reps=REPS)
    assert few["verdict"] == "not decidable with these seeds (2 vs 2: too few for a 95% CI)"
    assert few["p"] == 1.0 and few["ci"] is None
    assert claims.ordering_verdict(WIN[:3], LOSE[:3], REPS)["verdict"].startswith("not decidable")
    assert claims.ordering_verdict(WIN[:4], LOSE[:4], reps=REPS)["verdict"] == "holds"
    x, y = [10.0, 30.0, 50.0, 70.0, 90.0], [20.0, 40.0, 60.0, 5.0, 6.0]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    assert claims.ordering_verdict(x, y, reps=REPS) == claims.ordering_verdict(x, y, reps=REPS)
    assert (np.random.get_state()[1] == before).all()  # the caller's random state is left alone


def test_confidence_intervals_contain_the_iqm_and_the_mean():
    scores = [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 1000.0]  # one outlier
    iqm = aggregate.interval(scores, "iqm", REPS)
    mean = aggregate.interval(scores, "mean", REPS)
    assert iqm["point"] == pytest.approx(35.0)  # the middle half: 20, 30, 40, 50
    assert mean["point"] == pytest.approx(151.25)
    for s in (iqm, mean):
        assert s["lo"] <= s["point"] <= s["hi"] and s["lo"] < s["hi"]
    assert iqm["hi"] - iqm["lo"] < mean["hi"] - mean["lo"]  # the IQM shrugs the outlier off
    one = aggregate.interval([42.0], "iqm", REPS)
    assert one == dict(point=42.0, lo=42.0, hi=42.0)


def test_aggregate_end_to_end_cis_orderings_history_and_figures(tmp_path):
    for seed in range(4):
        job(tmp_path, "trdt", "hopper-medium-replay", seed, [1.0, 50.0, 60.0 + seed, 70.0 + seed])
        job(tmp_path, "mo_dt", "hopper-medium-replay", seed, [1.0, 5.0, 6.0 + seed, 10.0 + seed])
    job(tmp_path, "dt", "hopper-medium-replay", 0, [3.0, 99.0], code="old", start=500)  # History
    job(tmp_path, "dt", "hopper-medium-replay", 0, [3.0, 20.0], code="new", start=900)
    summary = aggregate.main(aggregate.Args(folders=(str(tmp_path),), reps=REPS))
    text = (tmp_path / "tables.md").read_text()
    head = "| final: IQM [95% CI] | final: mean [95% CI] | last 3 evaluations: IQM [95% CI] |"
    assert head in text
    trdt = summary["columns"]["TRDT"]["stats"]["hopper-medium-replay"]
    assert trdt["mean_ci"]["point"] == pytest.approx(71.5)
    assert trdt["iqm_ci"]["point"] == pytest.approx(71.5)
    # each run's mean of its last three evaluations (50, 60 + s, 70 + s): 60 + 2s/3; IQM: seeds 1, 2
    assert trdt["last3_iqm_ci"]["point"] == pytest.approx(61.0)
    assert trdt["last3_iqm_ci"]["lo"] <= 61.0 <= trdt["last3_iqm_ci"]["hi"]
    assert "| hopper-medium-replay | TRDT | 4 | 71.5 [" in text
    cv = summary["columns"]["TRDT"]["curves"]["hopper-medium-replay"]
    assert cv["steps"] == [0, 100, 200, 300] and cv["iqm"][-1] == pytest.approx(71.5)
    assert all(lo <= m <= hi for lo, m, hi in zip(cv["lo"], cv["iqm"], cv["hi"]))
    (o,) = [o for o in summary["orderings"] if o["claim"] == "TRDT > MO-DT"]
    assert o["verdict"] == "holds" and o["p"] == 1.0 and o["n"] == (4, 4)
    row = "| TRDT > MO-DT | hopper-medium-replay | replica (not D4RL) | 4 vs 4 | 1.00 [1.00, 1.00]"
    assert "| Table 1.3 " + row + " |" in text
    (dt,) = [o for o in summary["orderings"] if o["claim"] == "MO-DT > DT"]
    assert dt["verdict"] == "not decidable with these seeds (4 vs 1: too few for a 95% CI)"
    # the DT column is the newest run's config; the older code's 99.0 is listed below, never pooled
    assert summary["columns"]["DT"]["stats"]["hopper-medium-replay"]["mean"] == 20.0
    (h,) = summary["history"]
    assert h["stats"]["mean"] == 99.0 and h["label"].startswith("DT [defaults, code ")
    assert text.index("### History") > text.index("### Table 1.3")
    assert text.count("| DT (ours) |") == 1  # one DT column, not one per code version
    for png in ("scores.png", "curves.png", "performance_profile.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png


def test_every_method_at_another_budget_is_not_comparable(tmp_path):
    """Issue 25: DT and the baselines at a smoke budget were "not reproduced", MO-DT "not
    comparable"; now one rule for all."""
    for method, extra in (("dt", ()), ("bc-10", ("--top-pct", "10")), ("mo_dt", ())):
        job(tmp_path, method, "hopper-medium-replay", 0, [1.0, 2.0], extra=extra)
    aggregate.main(aggregate.Args(folders=(str(tmp_path),), reps=REPS))
    lines = (tmp_path / "tables.md").read_text().splitlines()
    verdicts = [x for x in lines if x.startswith("| hopper-medium-replay |")]
    assert len(verdicts) == 4  # the layout's row and three statistics rows
    assert all("not comparable: differs in " in v and "updates" in v for v in verdicts[1:])
    data = dict(name="hopper-medium", source="d4rl")
    res = dict(method="dt", args=dict(exp_name="dt"), dataset=data, updates=40)
    assert claims.differences(res) == ["updates"]
    assert claims.differences(res | dict(updates=100_000)) == []  # the DT paper's budget
    bc = dict(method="bc", args=dict(exp_name="bc-10", top_pct=10), dataset=data, updates=10_000)
    assert claims.differences(bc) == ["updates"]
    assert claims.differences(bc | dict(updates=1_000_000)) == []


def test_no_two_columns_share_a_colour_and_hatch():
    looks = {(aggregate.style(i)["color"], aggregate.style(i)["hatch"]) for i in range(24)}
    assert len(looks) == 24
    assert len({aggregate.style(i)["color"] for i in range(12)}) == 12  # the old scores.png


def test_missing_rliable_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "rliable", None)  # import rliable now raises ImportError
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[stats\]"'):
        claims.ordering_verdict(WIN, LOSE, reps=REPS)


def test_curves_iqm_over_the_seeds_of_a_label(tmp_path):
    for seed in range(3):
        evals = [1.0, 10.0 * (seed + 1), 20.0 * (seed + 1)]
        job(tmp_path / "dt", "dt", "hopper-medium-replay", seed, evals)
    job(tmp_path / "mo", "mo_dt", "hopper-medium-replay", 0, [1.0, 3.0])
    runs = (f"DT={tmp_path / 'dt'}", f"MO-DT={tmp_path / 'mo'}")
    res = curves.main(curves.Args(runs=runs, out=str(tmp_path / "c"), reps=REPS))
    dt = res["labels"]["DT"]
    assert dt["n"] == 3 and dt["curve"]["steps"] == [0, 100, 200]
    assert dt["curve"]["iqm"][-1] == pytest.approx(40.0)  # of 20, 40, 60
    assert dt["final_iqm_ci"]["lo"] <= 40.0 <= dt["final_iqm_ci"]["hi"]
    assert res["labels"]["MO-DT"]["curve"] is None  # one run: its own curve, no IQM
    md = (tmp_path / "c" / "curves.md").read_text()
    assert "| DT | 3 | 40.0 [" in md and "| DT, seed 2 | dt |" in md
    assert "| MO-DT | 1 | 3.0 [3.0, 3.0] |" in md
    assert (tmp_path / "c" / "curves.png").stat().st_size > 10_000
    twice = (f"DT={tmp_path / 'dt'}", f"DT={tmp_path / 'dt'}")
    with pytest.raises(SystemExit, match="seed 0 twice"):
        curves.main(curves.Args(runs=twice, out=str(tmp_path / "d")))
    with pytest.raises(SystemExit, match="mixes methods"):
        curves.main(curves.Args(runs=(f"X={tmp_path}",), out=str(tmp_path / "e")))


def test_aggregate_never_replaces_tables_a_folder_already_holds_without_force(tmp_path):
    import aggregate

    job(tmp_path, "dt", "hopper-medium-replay", 0, [10.0, 20.0])
    (tmp_path / "tables.md").write_text("committed")
    with pytest.raises(SystemExit, match=r"already holds tables\.md; add --force"):
        aggregate.main(aggregate.Args(folders=(str(tmp_path),), reps=20))
    assert (tmp_path / "tables.md").read_text() == "committed" and not (
        tmp_path / "scores.png"
    ).exists()
    aggregate.main(aggregate.Args(folders=(str(tmp_path),), reps=20, force=True))
    assert (tmp_path / "tables.md").read_text() != "committed"
