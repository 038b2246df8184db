"""Issue 27's verdict table: every attention and behaviour claim of benchmarks/, its verdict before
issue 27 (the old code on a trained model) and after (today's code, beside a random-init control),
with the control's value, in one markdown table and one JSON.

    python benchmarks/verdict_table.py --out benchmarks/results/verdicts \\
        --tt-before git:cbb0843:benchmarks/results/tt/summary.json --tt-after TT/summary.json \\
        --iem-before git:f51f6ce:benchmarks/results/iem/summary.json --iem-after IEM/summary.json \\
        --attention-after ATT --rgdt-after benchmarks/results/rgdt_arch \\
        --eval-context-after benchmarks/results/eval_context/dt_hopper-medium-replay_s0.json

Each input is an analysis's own output (`git:COMMIT:PATH` reads a committed version). Where there is
no "before" summary the row says why: attention.py's old verdict is the old rule (claims.py's
later_blocks_claim at ce87813, before the control) applied to the masses measured now; rgdt_analysis
committed no summary before issue 27; K' is new in issue 27. The "old code, untrained" column is
what issue 27 reports the old code said on random-init models.

    python benchmarks/verdict_table.py --rejudge benchmarks/results/rgdt_arch \\
        benchmarks/results/eval_context/dt_hopper-medium-replay_s0.json

recomputes the verdicts of committed summaries with today's rule (benchmarks/attention.py,
beyond_control) from the numbers they store, in place, adds a `rejudged` field (rule, commit, old
verdicts) and prints old -> new. Nothing else in them changes: a recomputed claim whose text differs
from the stored one is refused (the numbers were not what the claim was judged on).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
from claims import later_blocks_claim  # noqa: E402

RULE = (
    "benchmarks/attention.py beyond_control: holds if gap > spread and beyond the factor; does not "
    "hold if gap < -spread (spread 0: gap <= 0); else not decidable at this budget"
)
NONE_BEFORE = {
    "rgdt_analysis": "- (no rgdt_analysis summary committed before issue 27)",
    "eval_context": "- (new in issue 27: no K' evaluation before)",
}
# What issue 27 reports the old code said on random-init (never trained) models; other claims
# were not listed there. Analysis 1's "partly" is for the DT/TT pair as a whole.
OLD_UNTRAINED = {
    ("tt_analysis", "1"): "partly",
    ("tt_analysis", "4"): "holds",
    ("tt_analysis", "6"): "partly",
    ("tt_analysis", "9"): "holds",
    ("iem_analysis", "deep_grid"): "holds",
    ("iem_analysis", "past_future"): "holds",
}
COLUMNS = (
    ("analysis", "analysis"),
    ("claim", "claim"),
    ("before", "before issue 27 (trained)"),
    ("after", "after (trained)"),
    ("ours", "ours (after)"),
    ("control", "random-init control (after)"),
    ("old_untrained", "old code, untrained (issue 27)"),
)


@dataclass
class Args:
    out: Optional[str] = None
    """folder of verdict_table.md and .json (default: a new runs/verdict_table__{time}); one that
    holds files only with --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    tt_before: Optional[str] = None
    """tt_analysis summary.json before issue 27 (a path or git:COMMIT:PATH)"""
    tt_after: Optional[str] = None
    """tt_analysis summary.json of today's code"""
    iem_before: Optional[str] = None
    """iem_analysis summary.json before issue 27"""
    iem_after: Optional[str] = None
    """iem_analysis summary.json of today's code"""
    iem_level: str = "GoToLocalS7N5"
    """the BabyAI level of the iem rows (both summaries must hold it)"""
    attention_after: Optional[str] = None
    """attention.py's --out folder (attention_comparison.json)"""
    rgdt_after: Optional[str] = None
    """rgdt_analysis's --out folder (fig2_2.json, aim3.json)"""
    eval_context_after: tuple[str, ...] = ()
    """eval_context.py's JSON files"""
    rejudge: tuple[str, ...] = ()
    """instead of a table: re-judge these committed outputs in place (an rgdt_analysis folder or an
    eval_context JSON)"""


def read_json(spec: str, flag: str) -> dict:
    """A JSON file, or `git:COMMIT:PATH`, the version committed at COMMIT."""
    if spec.startswith("git:"):
        ref = spec[4:]
        got = subprocess.run(["git", "show", ref], cwd=ROOT, capture_output=True, text=True)
        if got.returncode:
            raise SystemExit(f"error: {flag} {spec}: git show {ref} failed; pass COMMIT:PATH.")
        return json.loads(got.stdout)
    if not Path(spec).is_file():
        raise SystemExit(f"error: {flag} {spec}: no such file; pass an analysis's output JSON.")
    return json.loads(Path(spec).read_text())


def row(analysis, claim, before, after, ours="", control="", key=None) -> dict:
    old = OLD_UNTRAINED.get((analysis, str(key)), "not listed")
    return dict(
        analysis=analysis,
        claim=claim,
        before=before,
        after=after,
        ours=ours,
        control=control,
        old_untrained=old,
    )


def tt_rows(before: dict, after: dict) -> list[dict]:
    """tt_analysis: claims matched by analysis number and order within it (analysis 1 has a DT
    row and a TT row)."""
    old = {}
    for c in before["claims"]:
        old.setdefault(str(c["analysis"]), []).append(c)
    rows, seen = [], {}
    for c in after["claims"]:
        n = str(c["analysis"])
        i = seen[n] = seen.get(n, -1) + 1
        b = old.get(n, [])
        was = b[i]["verdict"] if i < len(b) else "- (no such claim before)"
        claim = f"{n}. {c['blog']}"
        rows.append(
            row("tt_analysis", claim, was, c["verdict"], c["ours"], c.get("control", "-"), n)
        )
    return rows


def iem_rows(before: dict, after: dict, level: str) -> list[dict]:
    """iem_analysis: the four claims of one level, by their keys."""
    for name, s in (("before", before), ("after", after)):
        if level not in s["levels"]:
            have = ", ".join(s["levels"])
            raise SystemExit(f"error: --iem-level {level}: not in the {name} summary ({have}).")
    old, new = before["levels"][level]["claims"], after["levels"][level]["claims"]
    return [
        row(
            "iem_analysis",
            f"{level}: {c['blog']}",
            old[k]["verdict"] if k in old else "- (no such claim before)",
            c["verdict"],
            c["ours"],
            c["control"],
            k,
        )
        for k, c in new.items()
    ]


def old_later_blocks(method: str, mass: list, modalities: list, samples: int) -> str:
    """The verdict attention.py printed before the control (ce87813): claims.py's
    later_blocks_claim, which attention.py still calls for the claim's text and overrides the
    verdict of: "reproduced" when every block after the first puts more mass on the favoured
    modalities than on any other, "partly" when only the last does."""
    return later_blocks_claim(method, mass, modalities, samples)["verdict"]


def attention_rows(folder: str) -> list[dict]:
    """attention.py: one claim per checkpoint, in the order of its models."""
    s = read_json(str(Path(folder) / "attention_comparison.json"), "--attention-after")
    rows = []
    for (name, m), c in zip(s["models"].items(), s["claims"]):
        method = name.split(" ")[0]
        was = old_later_blocks(method, m["modality_mass_mean"], m["modalities"], m["samples"])
        was += " (old rule on these masses)"
        claim = f"{name}: {c['claim']}"
        rows.append(row("attention", claim, was, c["verdict"], c["ours"], c.get("control", "")))
    return rows


def rgdt_rows(folder: str) -> list[dict]:
    claims = []
    for f in ("fig2_2.json", "aim3.json"):
        claims += read_json(str(Path(folder) / f), "--rgdt-after")["claims"]
    none = NONE_BEFORE["rgdt_analysis"]
    return [
        row("rgdt_analysis", c["claim"], none, c["verdict"], c["ours"], c["control"])
        for c in claims
    ]


def eval_context_rows(files: tuple) -> list[dict]:
    rows = []
    for f in files:
        for r in read_json(f, "--eval-context-after")["results"]:
            v = r["verdict"]
            claim = f"§1.3.2: a shorter evaluation context hurts ({r['method']}, K = {r['K']})"
            ours = f"drop {v['drop']:+.1f} (margin {v['margin']:.1f})"
            control = f"drop {v['control_drop']:+.1f}"
            rows.append(row("eval_context", claim, NONE_BEFORE["eval_context"], v["verdict"], ours,
                            control))  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    """One row per claim; `|` inside a cell escaped."""
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (str(r[k]).replace("|", "\\|").replace("\n", " ") for k, _ in COLUMNS)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(a: Args) -> list[dict]:
    rows = []
    pairs = (("tt", a.tt_before, a.tt_after), ("iem", a.iem_before, a.iem_after))
    for name, before, after in pairs:
        if (before is None) != (after is None):
            raise SystemExit(f"error: --{name}-before and --{name}-after go together; pass both.")
    if a.tt_after:
        rows += tt_rows(read_json(a.tt_before, "--tt-before"), read_json(a.tt_after, "--tt-after"))
    if a.iem_after:
        before, after = (
            read_json(a.iem_before, "--iem-before"),
            read_json(a.iem_after, "--iem-after"),
        )
        rows += iem_rows(before, after, a.iem_level)
    if a.attention_after:
        rows += attention_rows(a.attention_after)
    if a.rgdt_after:
        rows += rgdt_rows(a.rgdt_after)
    rows += eval_context_rows(a.eval_context_after)
    if not rows:
        raise SystemExit("error: no summaries given; pass --tt-after/--tt-before and the others.")
    return rows


# --------------------------------------------------------------------------------------------------
# Re-judging committed summaries with today's rule (issue 27's fairer "does not hold")
# --------------------------------------------------------------------------------------------------


def rule_commit() -> str:
    """The commit that last changed the rule's file: the rule the new verdicts follow."""
    got = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", "benchmarks/attention.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return got.stdout.strip() or "unknown"


def replace_claims(old: list[dict], new: list[dict], where: str) -> list[tuple]:
    """The new claims' verdicts into the old ones; every other field must be the same."""
    changes = []
    for o, n in zip(old, new, strict=True):
        if {k: v for k, v in o.items() if k != "verdict"} != {
            k: v for k, v in n.items() if k != "verdict"
        }:
            raise SystemExit(
                f"error: {where}: claim {o['claim']!r} recomputes to other numbers; its summary "
                "is not what it was judged on (rerun the analysis instead)."
            )
        changes.append((where, o["claim"], o["verdict"], n["verdict"]))
        o["verdict"] = n["verdict"]
    return changes


def rejudge_rgdt(folder: Path, stamp: dict) -> list[tuple]:
    """fig2_2.json and aim3.json of an rgdt_analysis --out: their claims recomputed by
    rgdt_analysis's own verdict functions from the numbers they hold."""
    import rgdt_analysis

    changes = []
    for name in ("fig2_2.json", "aim3.json"):
        path = folder / name
        s = json.loads(path.read_text())
        if name == "fig2_2.json":
            # K_s: the final row of the probe attention has one entry per state token
            k_s = len(s["attention"]["full_context"]["final_row"])
            new = rgdt_analysis.fig_2_2_claims(s, k_s)
        else:
            new = rgdt_analysis.aim_3_claims(s)
        got = replace_claims(s["claims"], new, str(path))
        old = [c for _, _, c, _ in got]
        s["rejudged"] = dict(stamp, old_verdicts=old)
        path.write_text(json.dumps(s))
        changes += got
    return changes


def rejudge_eval_context(path: Path, stamp: dict) -> list[tuple]:
    """An eval_context.py JSON: each checkpoint's "a shorter context hurts" from its rows."""
    import eval_context

    s = json.loads(path.read_text())
    changes, old = [], []
    for r in s["results"]:
        new = eval_context.shorter_hurts(r["rows"], r["control_rows"], r["K"])
        was = r["verdict"]
        if {k: v for k, v in was.items() if k not in ("verdict", "sentence")} != {
            k: v for k, v in new.items() if k not in ("verdict", "sentence")
        }:
            raise SystemExit(f"error: {path}: {r['method']}'s drop recomputes to other numbers.")
        changes.append((str(path), f"{r['method']} K = {r['K']}", was["verdict"], new["verdict"]))
        old.append(was["verdict"])
        r["verdict"] = new
    s["rejudged"] = dict(stamp, old_verdicts=old)
    path.write_text(json.dumps(s, indent=1))
    return changes


def rejudge(paths: tuple) -> list[tuple]:
    stamp = dict(rule=RULE, rule_commit=rule_commit())
    changes = []
    for p in map(Path, paths):
        if p.is_dir() and (p / "aim3.json").is_file():
            changes += rejudge_rgdt(p, stamp)
        elif p.is_file() and p.suffix == ".json":
            changes += rejudge_eval_context(p, stamp)
        else:
            raise SystemExit(
                f"error: --rejudge {p}: neither an rgdt_analysis folder (with aim3.json) nor an "
                "eval_context JSON; pass one of those."
            )
    for where, claim, old, new in changes:
        print(f"{where}: {claim}: {old} -> {new}")
    return changes


def main(a: Args) -> list:
    if a.rejudge:
        return rejudge(a.rejudge)
    out = common.output_folder(a.out, "verdict_table", a.force)
    rows = table(a)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows)
    (out / "verdict_table.md").write_text(md)
    sources = {k: v for k, v in vars(a).items() if k not in ("out", "force", "rejudge")}
    (out / "verdict_table.json").write_text(json.dumps(dict(sources=sources, rows=rows), indent=1))
    print(md)
    print(f"wrote {out / 'verdict_table.md'} and verdict_table.json")
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
