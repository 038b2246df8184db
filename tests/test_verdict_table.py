"""benchmarks/verdict_table.py on small hand-made summaries: one row per claim with the verdict
before and after issue 27 and the random-init control's value; and the re-judging of committed
summaries with today's rule (a wrong-way mean inside the noise margin is no longer "does not
hold")."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import verdict_table  # noqa: E402
from verdict_table import Args  # noqa: E402


def write(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def tt_claim(n, verdict, blog="b", control="c"):
    return {"analysis": n, "blog": blog, "ours": "o", "control": control, "verdict": verdict}


def iem_summary(verdicts: dict) -> dict:
    claims = {
        k: {"blog": f"blog {k}", "ours": "o", "control": "c", "verdict": v}
        for k, v in verdicts.items()
    }
    return {"levels": {"GoToLocalS7N5": {"claims": claims}}}


def attention_summary(dt_mass, control_share) -> dict:
    mods = ["rtg", "states", "actions"]
    models = {"dt (run0)": dict(modalities=mods, modality_mass_mean=dt_mass, samples=10)}
    claim = {
        "claim": "Fig. 1.1: later blocks attend to actions",
        "ours": "o",
        "control": f"actions {control_share}",
        "verdict": "does not hold",
    }
    return {"models": models, "claims": [claim]}


def test_the_table_pairs_before_and_after_per_claim(tmp_path):
    # the old summary's analysis numbers are strings, the new ones ints; analysis 1 has two rows
    before = {"claims": [tt_claim("1", "partly"), tt_claim("1", "partly"), tt_claim("4", "holds")]}
    after = {"claims": [tt_claim(1, "holds"), tt_claim(1, "does not hold"), tt_claim(4, "x")]}
    after["claims"].append(tt_claim(10, "holds"))  # a claim with no "before"
    att = tmp_path / "att"
    att.mkdir()
    # the old rule (no control): actions beat the others in block 2 -> "reproduced"
    write(
        att / "attention_comparison.json",
        attention_summary([[0.4, 0.3, 0.3], [0.1, 0.2, 0.7]], 0.65),
    )
    a = Args(
        out=str(tmp_path / "out"),
        tt_before=write(tmp_path / "tb.json", before),
        tt_after=write(tmp_path / "ta.json", after),
        iem_before=write(tmp_path / "ib.json", iem_summary({"deep_grid": "holds"})),
        iem_after=write(tmp_path / "ia.json", iem_summary({"deep_grid": "not decidable"})),
        attention_after=str(att),
    )
    rows = verdict_table.main(a)
    got = [(r["analysis"], r["before"], r["after"], r["old_untrained"]) for r in rows]
    assert got[:4] == [
        ("tt_analysis", "partly", "holds", "partly"),
        ("tt_analysis", "partly", "does not hold", "partly"),
        ("tt_analysis", "holds", "x", "holds"),
        ("tt_analysis", "- (no such claim before)", "holds", "not listed"),
    ]
    assert got[4] == ("iem_analysis", "holds", "not decidable", "holds")
    assert rows[5]["before"].startswith("reproduced") and rows[5]["after"] == "does not hold"
    assert rows[5]["control"] == "actions 0.65"
    md = (tmp_path / "out" / "verdict_table.md").read_text()
    assert md.count("\n") == 2 + len(rows) and "random-init control (after)" in md
    saved = json.loads((tmp_path / "out" / "verdict_table.json").read_text())
    assert saved["rows"] == rows
    # nothing is overwritten without --force
    with pytest.raises(SystemExit, match="--out .*holds files"):
        verdict_table.main(a)


def test_the_old_attention_rule():
    old = verdict_table.old_later_blocks
    mods = ["rtg", "states", "actions"]
    assert old("dt", [[1, 0, 0], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6]], mods, 5) == "reproduced"
    assert old("dt", [[1, 0, 0], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6]], mods, 5) == "partly"
    assert old("dt", [[1, 0, 0], [0.6, 0.2, 0.2]], mods, 5) == "not reproduced"
    assert old("dt", [[1, 0, 0], [0.2, 0.2, 0.6]], mods, 0).startswith("not measured")


def test_bad_inputs_say_which_flag(tmp_path):
    with pytest.raises(SystemExit, match="--tt-before .*no such file"):
        verdict_table.main(Args(out=str(tmp_path / "o"), tt_before="nope.json", tt_after="x"))
    with pytest.raises(SystemExit, match="--iem-before and --iem-after go together"):
        verdict_table.main(Args(out=str(tmp_path / "o"), iem_after="x"))
    with pytest.raises(SystemExit, match="no summaries given"):
        verdict_table.main(Args(out=str(tmp_path / "o")))
    with pytest.raises(SystemExit, match="--rejudge .*neither"):
        verdict_table.main(Args(rejudge=(str(tmp_path),)))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    spec = f"git:{head.stdout.strip()}:no/such/file.json"
    with pytest.raises(SystemExit, match="--tt-before git:.*git show .* failed"):
        verdict_table.read_json(spec, "--tt-before")


def aim(seq2seq, gpt):
    """rgdt_analysis's aim3.json numbers: per-seed scores, learned NLLs, controls far worse."""
    n = len(seq2seq)
    per = {"seq2seq_score": seq2seq, "gpt_score": gpt}
    per |= {"seq2seq_control_score": [1.0] * n, "gpt_control_score": [1.0] * n}
    per |= {"seq2seq_nll": [-5.0] * n, "gpt_nll": [-4.0] * n}
    per |= {"seq2seq_control_nll": [3.0] * n, "gpt_control_nll": [3.0] * n}
    return {"per_seed": per, **{k: float(np.mean(v)) for k, v in per.items()}}


def fig():
    regime = dict(
        final_row=[0.2] * 5, final_row_newest_two=0.4, final_row_entropy=1.6, uniform_entropy=1.6
    )
    att = dict(full_context=regime, final_token=regime, control=regime)
    return dict(correlation_mean=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5], attention=att)


def test_rejudge_changes_only_the_verdicts(tmp_path):
    """A wrong-way mean score inside two standard errors of the per-seed differences (aim (3)'s
    committed case) was "does not hold"; re-judged it is not decidable. The other numbers stay."""
    import rgdt_analysis

    folder = tmp_path / "rgdt"
    folder.mkdir()
    a, f = aim([56.2, 8.7, 67.3], [17.3, 43.0, 75.9]), fig()
    a["claims"] = rgdt_analysis.aim_3_claims(a)
    f["claims"] = rgdt_analysis.fig_2_2_claims(f, 5)
    a["claims"][0]["verdict"] = "does not hold"  # what the old rule said
    write(folder / "aim3.json", a)
    write(folder / "fig2_2.json", f)
    changes = verdict_table.main(Args(rejudge=(str(folder),)))
    assert [(old, new) for *_, old, new in changes][2] == (
        "does not hold",
        "not decidable at this budget",
    )
    saved = json.loads((folder / "aim3.json").read_text())
    assert saved["claims"][0]["verdict"] == "not decidable at this budget"
    assert saved["rejudged"]["old_verdicts"][0] == "does not hold"
    assert "gap < -spread" in saved["rejudged"]["rule"] and saved["rejudged"]["rule_commit"]
    assert {k: v for k, v in saved.items() if k not in ("claims", "rejudged")} == {
        k: v for k, v in a.items() if k != "claims"
    }
    # a summary whose numbers no longer give its claims' texts is refused
    saved["seq2seq_score"] = 99.0
    write(folder / "aim3.json", saved)
    with pytest.raises(SystemExit, match="recomputes to other numbers"):
        verdict_table.main(Args(rejudge=(str(folder),)))
