"""benchmarks/seeds_needed.py: how many seeds would decide an ordering (issue 26's note), on
hand-made summaries: a clear effect is decided at the fewest seeds, a tie never; bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import seeds_needed  # noqa: E402

WIN, LOSE = (60.0, 70.0, 80.0, 90.0, 95.0), (1.0, 2.0, 3.0, 4.0, 5.0)
SAME = (10.0, 20.0, 30.0, 40.0, 50.0)


def summary(path: Path, columns: dict, claims: list[tuple[str, str]]) -> Path:
    """The part of aggregate.py's summary.json that seeds_needed reads."""
    d = "hopper-medium-replay"
    per_seed = {c: {"stats": {d: {"per_seed": dict(enumerate(s))}}} for c, s in columns.items()}
    # P(X > Y) as aggregate.py stores it beside each judged ordering
    known = {(WIN, LOSE): 1.0, (LOSE, WIN): 0.0}
    p = [known.get((columns[x], columns[y]), 0.5) for x, y in claims]
    orderings = [dict(claim=f"{x} > {y}", dataset=d, p=q) for (x, y), q in zip(claims, p)]
    orderings.append(dict(claim="RGDT > DT", dataset=None))  # no row with both: skipped
    path.write_text(json.dumps(dict(columns=per_seed, orderings=orderings)))
    return path


def test_clear_effect_needs_fewest_seeds_and_tie_is_never_decided(tmp_path):
    cols = {"TRDT": WIN, "DT": LOSE, "A": SAME, "B": SAME}
    path = summary(tmp_path / "summary.json", cols, [("TRDT", "DT"), ("DT", "TRDT"), ("A", "B")])
    args = seeds_needed.Args(str(path), out=str(tmp_path / "out"), n=[4, 6], sims=5, reps=100)
    rows = {r["claim"]: r for r in seeds_needed.main(args)["rows"]}
    assert set(rows) == {"TRDT > DT", "DT > TRDT", "A > B"}
    assert rows["TRDT > DT"]["shares"][4]["holds"] == 1.0
    assert rows["TRDT > DT"]["seeds_needed"] == 4
    assert rows["DT > TRDT"]["shares"][6]["does not hold"] == 1.0
    assert rows["DT > TRDT"]["seeds_needed"] == 4
    # A tie is "not decidable" however many seeds: never enough
    assert rows["A > B"]["observed_p"] == pytest.approx(0.5)
    assert rows["A > B"]["seeds_needed"] is None
    md = (tmp_path / "out" / "seeds_needed.md").read_text()
    assert "| A > B | hopper-medium-replay | 5 vs 5 | 0.50 |" in md and "more than 6" in md
    saved = json.loads((tmp_path / "out" / "seeds_needed.json").read_text())
    assert saved["config"]["sims"] == 5 and "commit" in saved and "wall_s" in saved
    assert (tmp_path / "out" / "seeds_needed.png").stat().st_size > 0


def test_needed_is_the_smallest_n_with_enough_decided_draws():
    undecided = seeds_needed.UNDECIDED
    by_n = {5: {undecided: 0.5}, 10: {undecided: 0.2}, 20: {undecided: 0.1}}
    assert seeds_needed.needed(by_n, 0.8) == 10
    assert seeds_needed.needed(by_n, 0.95) is None


def cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "seeds_needed.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--n", "1", "5"], "--n [1, 5]: each must be >= 2"),
        (["--sims", "0"], "--sims 0: must be >= 1"),
        (["--power", "1.5"], "--power 1.5: must be in (0, 1]"),
    ],
)
def test_bad_flags_give_one_line_and_write_nothing(tmp_path, extra, words):
    path = summary(tmp_path / "summary.json", {"X": WIN, "Y": LOSE}, [("X", "Y")])
    p = cli(path, "--out", tmp_path / "out", *extra)
    assert p.returncode != 0 and words in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_bad_files_give_one_line(tmp_path):
    p = cli(tmp_path / "missing.json")
    assert p.returncode != 0 and "missing.json: no such file" in p.stderr
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"normalized_mean": 3.0}))
    p = cli(bad, "--out", tmp_path / "out")
    assert "not a summary.json of benchmarks/aggregate.py" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "out").exists()
