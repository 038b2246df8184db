"""Turn benchmark results into the thesis's tables (Table 1.3, Table 2.1), with confidence
intervals, ordering verdicts, a bar chart, learning curves and performance profiles.

    python benchmarks/aggregate.py benchmarks/results/cpu [more folders ...] [--out DIR]

Reads every `*/results.json` that benchmarks/run.py wrote, and the `metrics.jsonl` beside it.
Statistics come from rliable (Agarwal et al., NeurIPS 2021), the optional extra
`pip install -e ".[stats]"`: every [low, high] is a 95% stratified-bootstrap confidence interval
over seeds, drawn from a fixed seed, so the same results give the same tables.

Columns. Seeds are pooled only within one config (same command but for the seed, same code, same
data source). One column per method and data source (RGDT with --full-context-loss is its own,
Fig. 2.3): in each row, the method's newest config with results there (by the time of its git
commit, then of the run's start, then of the file). The configs it superseded (older code, other
flags) are listed under "History", never pooled with it.
- Table 1.3 / 2.1 layout, "ours": the mean over seeds of each run's final evaluation [95% CI]
  (n seeds); "thesis": the thesis's number (± where Table 1.3 prints one). The totals add our
  means over the rows where both have a number, beside the thesis's total over the same rows and
  its printed total.
- "Statistics", per row and column, over seeds: "final: IQM" and "final: mean" of the final
  evaluation (IQM: the interquartile mean, the mean of the middle 50% of runs, robust to one
  outlier seed); "last 3 evaluations: IQM" of each run's mean over its last three evaluations
  (metrics.jsonl), less at the mercy of one lucky or unlucky checkpoint; each [95% CI].
- "vs thesis" (benchmarks/claims.py's rule): "reproduced" within one standard deviation of the
  thesis's number, "partly" within two, else "not reproduced"; "not comparable: differs in ..."
  for any run whose settings differ from those behind the thesis's number, the budget (updates)
  included, for every method.
Orderings (claims.ORDERINGS: TRDT > MO-DT > DT, RGDT > DT, RGDT > 10%BC, final-token RGDT >
full-context RGDT), on each row both columns have: P(X > Y), the probability that a run of X
scores above a run of Y, with its 95% CI. "holds" where the CI's lower end is above 0.5, "does not
hold" where its upper end is below 0.5, else "not decidable with these seeds" (always so below
4 vs 4 seeds, see claims.ordering_verdict).
Figures: scores.png (mean over seeds with its 95% CI, the thesis's numbers as black ticks),
curves.png (IQM over seeds of the evaluation score against updates, 95% CI band) and
performance_profile.png (per table, the fraction of runs scoring above each normalized score τ,
95% CI band). Also writes tables.md and summary.json.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from claims import CI, ORDERINGS, PRINTED_TOTALS, SOURCE_LABEL, TABLE_1_3, TABLE_2_1  # noqa: E402
from claims import THESIS, THESIS_STD, differences, ordering_verdict, rliable  # noqa: E402
from claims import seeded, verdict  # noqa: E402
from run import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("scores.png", "curves.png", "performance_profile.png")


@dataclass
class Args:
    """Tables 1.3 / 2.1 layout with 95% bootstrap CIs (rliable), verdicts on the thesis's orderings
    by P(X > Y), the configs each column superseded (History), scores.png, curves.png and
    performance_profile.png, from the results folders of benchmarks/run.py. A layout cell: the mean
    over seeds of the final evaluation [95% CI] (n seeds). "Statistics": IQM and mean of the final
    evaluation and IQM of each run's mean over its last three evaluations, each [95% CI]; "vs
    thesis": reproduced / partly / not reproduced, or not comparable (other settings or budget).
    An ordering X > Y "holds" where the CI of P(X > Y) lies above 0.5, "does not hold" where it
    lies below, else "not decidable with these seeds" (always so below 4 vs 4 seeds). Needs
    pip install -e ".[stats]"."""

    folders: tyro.conf.Positional[tuple[str, ...]]
    """results folders written by benchmarks/run.py"""
    out: str = ""
    """where to write tables.md, summary.json and the PNGs (default: the first folder)"""
    force: bool = False
    """replace the tables and figures a folder already holds (committed ones under
    benchmarks/results/ among them); without it such a folder is refused and nothing is written"""
    reps: int = 2000
    """bootstrap resamples per confidence interval (from a fixed seed: same results, same CIs)"""


def read_evals(path: Path) -> list[tuple[int, float]]:
    """(update, normalized score) of every evaluation in a metrics.jsonl, by update; a line cut by
    a kill is skipped, and an update evaluated twice (a resumed run) keeps its last score."""
    evals = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval_normalized" in row:
            evals[row["step"]] = row["eval_normalized"]
    return sorted(evals.items())


def load(folders) -> list[dict]:
    results = []
    for folder in folders:
        for f in sorted(Path(folder).glob("*/results.json")):
            r = json.loads(f.read_text())
            if "benchmark" not in r:
                continue
            r["_folder"] = str(f.parent)
            r["_evals"] = read_evals(f.parent / "metrics.jsonl")
            results.append(r)
    return results


def config_flags(r: dict) -> list[str]:
    """The job's command without seed and dataset (--seed, --env, --dataset-path and their values),
    plus the data source as a pseudo-flag `--data`: runs on the replica and on official D4RL never
    share a mean."""
    kept, skip = [], False
    for tok in r["benchmark"]["cmd"]:
        if tok.startswith("--"):
            skip = tok in ("--seed", "--env", "--dataset-path")
        if not skip:
            kept.append(tok)
    return kept + ["--data", r["dataset"]["source"]]


def config_id(r: dict) -> str:
    """Hash of config_flags plus the code hash: what must be equal for seeds to be pooled."""
    key = dict(cmd=config_flags(r), code=r["benchmark"]["code_sha256"])
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]


def variant_label(flags: list[str], siblings: list[list[str]]) -> str:
    """How one config differs from its siblings, for a label a reader can parse: the flags (with
    values) not shared by every sibling, e.g. '--lr 1e-3'; 'defaults' when it only lacks flags the
    others set."""

    def parse(toks):
        d, key = {}, None
        for t in toks:
            if t.startswith("--"):
                key = t
                d[key] = ""
            elif key:
                d[key] = (d[key] + " " + t).strip()
        return d

    own, all_ = parse(flags), [parse(f) for f in siblings]
    diff = [f"{k} {v}".strip() for k, v in own.items() if any(o.get(k) != v for o in all_)]
    return " ".join(diff) if diff else "defaults"


FULL = "-full-context"  # claims.ORDERINGS's suffix for rgdt.py --full-context-loss


def label_of(key: str) -> str:
    """A column's label from its claim key: run.py's label, RGDT's full-context loss named."""
    label = METHODS[key.removesuffix(FULL)]["label"]
    return label + (" (full-context loss)" if key.endswith(FULL) else "")


def claim_key(r: dict) -> str:
    """The method as claims.ORDERINGS names it: run.py's; RGDT's full-context loss apart."""
    # run.py's rgdt-full is rgdt with the flag
    method = r["benchmark"]["method"].removesuffix("-full")
    return method + FULL if "--full-context-loss" in r["benchmark"]["cmd"] else method


@functools.lru_cache(maxsize=None)
def commit_time(commit: str) -> int:
    """Unix time of a commit in this repository (0 when git does not know it)."""
    cmd = ["git", "show", "-s", "--format=%ct", commit]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def recency(rs: list[dict]) -> tuple:
    """How new a config's results are: its newest commit's time, then the newest run's start (the
    method files end their run folder's name with it), then the newest results.json's file time."""

    def started(r):
        tail = Path(r.get("run_dir", "")).name.rsplit("__", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    return (
        max(commit_time(r["git_commit"]) if r.get("git_commit") else 0 for r in rs),
        max(started(r) for r in rs),
        max((Path(r["_folder"]) / "results.json").stat().st_mtime for r in rs),
    )


def bootstrap(reps: int) -> dict:
    return dict(reps=reps, confidence_interval_size=CI)


def interval(values, stat: str, reps: int) -> dict | None:
    """rliable's point estimate ("iqm" or "mean" over runs) and its 95% stratified-bootstrap CI."""
    if values is None or not len(values):
        return None
    library, metrics = rliable()
    func = dict(iqm=metrics.aggregate_iqm, mean=metrics.aggregate_mean)[stat]
    scores = {"x": np.asarray(values, float).reshape(-1, 1)}  # (runs, 1 task)
    with seeded():
        point, ci = library.get_interval_estimates(scores, func, **bootstrap(reps))
    lo, hi = np.ravel(ci["x"]).tolist()
    return dict(point=float(point["x"]), lo=lo, hi=hi)


def last_three(rs: list[dict]) -> list[float] | None:
    """Each run's mean over its last three evaluations; None unless every run logged three."""
    if not all(len(r["_evals"]) >= 3 for r in rs):
        return None
    return [float(np.mean([v for _, v in r["_evals"][-3:]])) for r in rs]


def cell(rs: list[dict], reps: int) -> dict:
    """One config on one dataset: its seeds' final scores, their IQM and mean, the IQM of the last
    three evaluations (each with its CI), mean and std as before, and where the numbers come
    from."""
    final = np.array([r["normalized_mean"] for r in rs])
    return dict(
        mean=float(final.mean()),
        std=float(final.std()),
        n=len(rs),
        seeds=sorted(r["benchmark"]["seed"] for r in rs),
        per_seed={r["benchmark"]["seed"]: r["normalized_mean"] for r in rs},
        iqm_ci=interval(final, "iqm", reps),
        mean_ci=interval(final, "mean", reps),
        last3_iqm_ci=interval(last_three(rs), "iqm", reps),
        provenance=provenance(rs),
        differs_from_thesis=differences(rs[0]),
    )


def curve(rs: list[dict], reps: int) -> dict:
    """A config's learning curve: IQM over seeds at each update all seeds evaluated, with its CI."""
    return iqm_curve([dict(r["_evals"]) for r in rs if r["_evals"]], reps)


def iqm_curve(per_seed: list[dict], reps: int) -> dict:
    """IQM over seeds ({update: score} each) at every update all of them logged, with its 95% CI
    (rliable: one bootstrap over the whole curve); mean and std beside it."""
    steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    if not steps:
        return dict(steps=[], iqm=[], lo=[], hi=[], mean=[], std=[], n=0)
    vals = np.array([[p[s] for s in steps] for p in per_seed])
    library, metrics = rliable()

    def iqm_per_step(scores):  # scores: (runs, 1 task, steps)
        return np.array([metrics.aggregate_iqm(scores[..., k]) for k in range(scores.shape[-1])])

    scores = {"x": vals[:, None, :]}
    with seeded():
        point, ci = library.get_interval_estimates(scores, iqm_per_step, **bootstrap(reps))
    iqm, (lo, hi), mean, std = point["x"].tolist(), ci["x"].tolist(), vals.mean(0), vals.std(0)
    n, mean, std = len(vals), mean.tolist(), std.tolist()
    return dict(steps=steps, iqm=iqm, lo=lo, hi=hi, mean=mean, std=std, n=n)


def provenance(runs: list[dict], by_ds: dict | None = None) -> dict:
    """Where numbers come from: data source, updates, seeds per dataset, device, commit, wall
    time."""
    walls = [r["wall_time_s"] for r in runs if "wall_time_s" in r]
    return dict(
        data=sorted(
            {SOURCE_LABEL.get(r["dataset"]["source"], r["dataset"]["source"]) for r in runs}
        ),
        updates=sorted({r["updates"] for r in runs}),
        seeds=sorted({len(rs) for rs in by_ds.values()}) if by_ds else [len(runs)],
        device=sorted({r["device"] for r in runs}),
        commit=sorted({(r.get("git_commit") or "unknown")[:10] for r in runs}),
        wall_min_per_seed=[round(float(np.median(walls)) / 60, 1)] if walls else [],
    )


def group(results: list[dict]) -> dict:
    """{column label: dict(key, source, by_ds={dataset: {config id: [runs over seeds]}})}. A
    column is a method (RGDT's full-context loss apart) on one data source; the source joins the
    label only where a method has several."""
    configs = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in results:
        key = (claim_key(r), r["dataset"]["source"])
        configs[key][r["benchmark"]["dataset"]][config_id(r)].append(r)
    sources = defaultdict(set)
    for k, s in configs:
        sources[k].add(s)
    order = {m: i for i, m in enumerate(METHODS)}
    out = {}
    by_order = lambda kv: (order[kv[0][0].removesuffix(FULL)], kv[0])  # noqa: E731
    for (k, s), by_ds in sorted(configs.items(), key=by_order):
        label = label_of(k) + (f" [--data {s}]" if len(sources[k]) > 1 else "")
        out[label] = dict(key=k, source=s, by_ds=by_ds)
    return out


def columns(results: list[dict], reps: int) -> tuple[dict, list[dict]]:
    """The current column of each method (in each row its newest config) and the History: every
    config a column superseded, labelled by how its flags differ from its siblings'."""
    cols, history = {}, []
    for label, g in group(results).items():
        every = {cid: rs for by in g["by_ds"].values() for cid, rs in by.items()}
        flags = {cid: config_flags(rs[0]) for cid, rs in every.items()}
        stats, curves, chosen = {}, {}, {}
        for d, by_cid in g["by_ds"].items():
            cid, *older = sorted(by_cid, key=lambda c: recency(by_cid[c]), reverse=True)
            chosen[d], stats[d], curves[d] = cid, cell(by_cid[cid], reps), curve(by_cid[cid], reps)
            for old in older:
                h = dict(label=f"{label} [{sibling_label(old, flags)}]", column=label, dataset=d)
                history.append(h | dict(config=old, replaced_by=cid, stats=cell(by_cid[old], reps)))
        runs = {d: g["by_ds"][d][cid] for d, cid in chosen.items()}
        cols[label] = dict(method=g["key"].removesuffix(FULL), key=g["key"], configs=chosen,
                           config=", ".join(sorted(set(chosen.values()))),
                           provenance=provenance([r for rs in runs.values() for r in rs], runs),
                           stats=stats, curves=curves)  # fmt: skip
    return cols, history


def sibling_label(cid: str, flags: dict) -> str:
    """How config `cid` differs from the other configs of its column ({config id: flags}): its
    flags, or 'defaults, code ID' where only the code differs."""
    label = {c: variant_label(f, list(flags.values())) for c, f in flags.items()}
    variant = label[cid]
    twins = [c for c in flags if c != cid and label[c] == variant]
    return variant + (f", code {cid}" if twins else "")


# Each table's columns in the thesis's order, its quoted baselines first (Table 2.1 quotes 10% BC
# and DT); OWN: the table's own methods, whose other datasets join its rows.
TABLE_1_3_METHODS = ("bc", "bc-10", "dt", "dt-gaussian", "mo_dt", "trdt")
TABLE_2_1_METHODS = ("bc-10", "dt", "rgdt", "rgdt" + FULL)
OWN = {"Table 1.3": TABLE_1_3_METHODS[2:], "Table 2.1": TABLE_2_1_METHODS[2:]}


def printed_total(method: str, datasets: list[str]) -> str:
    """The thesis's printed total of a column. The quoted baselines print the sum of their rows
    (Table 1.3: BC 466.7, 10% BC 666.2; Table 2.1: 10% BC 487.2, DT 486.7); RGDT prints 539.0
    (its rows: 540.0)."""
    if method in PRINTED_TOTALS and (datasets == TABLE_1_3 or method == "rgdt"):
        return str(PRINTED_TOTALS[method])
    rows = [THESIS[method][d] for d in datasets if d in THESIS.get(method, {})]
    return f"{sum(rows):.1f}" if rows else "—"


def ci_text(s: dict | None) -> str:
    return "—" if s is None else f"{s['point']:.1f} [{s['lo']:.1f}, {s['hi']:.1f}]"


def thesis_text(method: str, d: str) -> str:
    t, t_std = THESIS.get(method, {}).get(d), THESIS_STD.get(method, {}).get(d)
    return "—" if t is None else f"{t:.2f}" + (f" ± {t_std:.2f}" if t_std is not None else "")


def layout(cols: dict, rows: list[str], datasets: list[str], title: str) -> tuple[list[str], dict]:
    """The thesis's layout: per column ours (mean over seeds [95% CI] (n)) | thesis; totals over the
    rows where both have a number, the thesis's over the same rows, and its printed total."""
    head = "| dataset | " + " | ".join(f"{k} (ours) | {k} (thesis)" for k in cols) + " |"
    lines = [f"### {title}", "", head, "|---" * (1 + 2 * len(cols)) + "|"]
    totals = {k: [0.0, 0.0, 0] for k in cols}
    for d in rows:
        cells = []
        for k, c in cols.items():
            s, t = c["stats"].get(d), THESIS.get(c["key"], {}).get(d)
            cells.append(f"{ci_text(s['mean_ci'])} (n={s['n']})" if s else "—")
            cells.append(thesis_text(c["key"], d))
            if s and t is not None:
                totals[k] = [totals[k][0] + s["mean"], totals[k][1] + t, totals[k][2] + 1]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    sums = [f"{v[0]:.1f} | {v[1]:.2f}" if v[2] else "— | —" for v in totals.values()]
    lines.append("| **total of means** (same rows) | " + " | ".join(sums) + " |")
    printed = [f"— | {printed_total(c['key'], datasets)}" for c in cols.values()]
    lines.append("| thesis's printed total (all rows) | " + " | ".join(printed) + " |")
    names = ("ours_total", "thesis_total_same_rows", "rows")
    return lines, {k: dict(zip(names, v)) for k, v in totals.items()}


def statistics(cols: dict, rows: list[str]) -> list[str]:
    """One line per (row, column): n, IQM and mean of the final evaluation, IQM of the last three,
    each with its 95% CI; the thesis's number and the verdict against it."""
    head = ("| dataset | column | seeds | final: IQM [95% CI] | final: mean [95% CI] | "
            "last 3 evaluations: IQM [95% CI] | thesis | vs thesis |")  # fmt: skip
    title = "Statistics over seeds (95% stratified-bootstrap CIs, rliable):"
    lines = ["", title, "", head, "|---" * 8 + "|"]
    for d in rows:
        for k, c in cols.items():
            s = c["stats"].get(d)
            if s:
                cells = [d, k, str(s["n"]), ci_text(s["iqm_ci"]), ci_text(s["mean_ci"])]
                cells.append(ci_text(s["last3_iqm_ci"]))
                cells += [thesis_text(c["key"], d), thesis_verdict(c, d)]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def thesis_verdict(c: dict, d: str) -> str:
    """claims.py's rule for one cell; where the thesis prints no ±, our spread over seeds."""
    s, t = c["stats"][d], THESIS.get(c["key"], {}).get(d)
    if t is None:
        return "— (no thesis number)"
    if s["differs_from_thesis"]:
        judged = "not comparable: differs in " + ", ".join(s["differs_from_thesis"])
    else:
        judged = verdict(s["mean"], t, THESIS_STD.get(c["key"], {}).get(d, s["std"]))
    return f"{judged} ({', '.join(s['provenance']['data'])} data)"


def shown(cols: dict, datasets: list, methods: tuple, own: tuple) -> tuple[dict, list]:
    """A table's rows: its own rows with a number, then any other dataset its own methods ran on;
    its columns: its methods with a number on one of those rows."""
    chosen = {k: v for k, v in cols.items() if v["key"] in methods}
    rows = [d for d in datasets if any(d in c["stats"] for c in chosen.values())]
    rows += sorted({d for c in chosen.values() if c["key"] in own for d in c["stats"]} - set(rows))
    return {k: c for k, c in chosen.items() if any(d in c["stats"] for d in rows)}, rows


def table(
    cols: dict, datasets: list[str], methods: tuple[str, ...], title: str
) -> tuple[str, dict]:
    """One table: the thesis layout, the statistics and the provenance of its columns."""
    chosen, rows = shown(cols, datasets, methods, OWN[title.split(" layout")[0]])
    if not chosen or not rows:
        return "", {}
    lines, totals = layout(chosen, rows, datasets, title)
    lines += statistics(chosen, rows)
    lines += ["", "Provenance:"]
    for k, c in chosen.items():
        p = c["provenance"]
        lines.append(
            f"- {k}: data {', '.join(p['data'])}; updates {p['updates']}; seeds per dataset "
            f"{p['seeds']}; device {', '.join(p['device'])}; commit {', '.join(p['commit'])}; "
            f"config {c['config']}"
            + (
                f"; wall time per seed {p['wall_min_per_seed'][0]} min (median)"
                if p["wall_min_per_seed"]
                else ""
            )
        )
    lines.append("")
    return "\n".join(lines), totals


def orderings(cols: dict, reps: int) -> list[dict]:
    """Every ordering of claims.ORDERINGS on every row both columns have (same data source), judged
    by claims.ordering_verdict on the seeds' final scores; one with no such row is not decidable."""
    by_key = defaultdict(dict)
    for label, c in cols.items():
        by_key[c["key"]][label] = c
    judged = []
    for o in ORDERINGS:
        found = []
        pairs = itertools.product(by_key[o["better"]].items(), by_key[o["worse"]].items())
        for (lx, cx), (ly, cy) in pairs:
            rows = [d for d in o["rows"] if d in cx["stats"] and d in cy["stats"]]
            for d in rows if cx["provenance"]["data"] == cy["provenance"]["data"] else []:
                x, y = (list(c["stats"][d]["per_seed"].values()) for c in (cx, cy))
                thesis = [THESIS.get(k, {}).get(d) for k in (o["better"], o["worse"])]
                row = dict(source=o["source"], claim=f"{lx} > {ly}", dataset=d, thesis=thesis)
                row["data"] = cx["provenance"]["data"]
                found.append(row | ordering_verdict(x, y, reps=reps))
        claim = f"{label_of(o['better'])} > {label_of(o['worse'])}"
        none = "not decidable: no row with results of both"
        none = dict(source=o["source"], claim=claim, dataset=None, verdict=none)
        judged += found or [none]
    return judged


def ordering_lines(judged: list[dict]) -> list[str]:
    head = ("| source | claim | dataset | data | seeds (X vs Y) | P(X > Y) [95% CI] | "
            "thesis (X, Y) | verdict |")  # fmt: skip
    title = "### Orderings the thesis states, judged by P(X > Y) over seeds"
    lines = [title, "", head, "|---" * 8 + "|"]
    for j in judged:
        if j["dataset"] is None:
            cells = [j["source"], j["claim"]] + ["—"] * 5 + [j["verdict"]]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        p = f"{j['p']:.2f}" + (f" [{j['ci'][0]:.2f}, {j['ci'][1]:.2f}]" if j["ci"] else "")
        thesis = ", ".join("—" if t is None else str(t) for t in j["thesis"])
        cells = [j["source"], j["claim"], j["dataset"], ", ".join(j["data"])]
        cells += ["{} vs {}".format(*j["n"]), p, thesis, j["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def history_lines(history: list[dict]) -> list[str]:
    if not history:
        return []
    lines = ["### History: configs a column above superseded (older code or other flags)", ""]
    for h in history:
        s, p = h["stats"], h["stats"]["provenance"]
        lines.append(f"- {h['label']}, {h['dataset']}: mean {ci_text(s['mean_ci'])}, "
                     f"IQM {ci_text(s['iqm_ci'])} (n={s['n']}); updates {p['updates']}; "
                     f"commit {', '.join(p['commit'])}; config {h['config']}, "
                     f"replaced by {h['replaced_by']}")  # fmt: skip
    return lines + [""]


def style(i: int) -> dict:
    """Column i's colour, hatch and line style: tab20's ten dark colours, then its ten light ones
    with a hatch and a dashed line, so that no two columns look alike (scores.png once drew 12 bars
    from a 10-colour cycle)."""
    import matplotlib

    ten = i // 10
    color = matplotlib.colormaps["tab20"]((2 * i) % 20 + ten % 2)
    hatch, line = ["", "//", "..", "xx"][ten % 4], ["-", "--", ":", "-."][ten % 4]
    return dict(color=color, hatch=hatch, linestyle=line)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_datasets(cols: dict) -> list[str]:
    datasets = [
        d
        for d in TABLE_1_3 + [x for x in TABLE_2_1 if x not in TABLE_1_3]
        if any(d in c["stats"] for c in cols.values())
    ]
    return datasets + sorted({d for c in cols.values() for d in c["stats"]} - set(datasets))


def plot_scores(cols: dict, out: Path) -> None:
    """scores.png: per dataset a bar per column, the mean over seeds with its 95% CI; the thesis's
    number as a black tick."""
    plt, datasets = pyplot(), plot_datasets(cols)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(datasets) * max(1, len(cols)) / 3), 4))
    w = 0.8 / max(1, len(cols))
    for i, (k, c) in enumerate(cols.items()):
        x = np.arange(len(datasets)) + i * w
        ci = [c["stats"].get(d, {}).get("mean_ci") for d in datasets]
        ours = [s["point"] if s else np.nan for s in ci]
        err = np.array([[s["point"] - s["lo"], s["hi"] - s["point"]] if s else [0, 0] for s in ci])
        st = style(i)
        edge = "white" if st["hatch"] else None
        look = dict(color=st["color"], hatch=st["hatch"], edgecolor=edge)
        ax.bar(x, ours, w, yerr=err.T, capsize=2, label=f"{k} (ours)", **look)
        thesis = [THESIS.get(c["key"], {}).get(d, np.nan) for d in datasets]
        ax.scatter(x, thesis, marker="_", s=200, color="k", zorder=3)
    ax.scatter([], [], marker="_", s=200, color="k", label="thesis (official D4RL)")
    ax.set_xticks(
        np.arange(len(datasets)) + 0.4 - w / 2, datasets, rotation=30, ha="right", fontsize=8
    )
    ax.set_ylabel("normalized score (mean over seeds, 95% CI)")
    # beside the axes: never over a bar
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(cols: dict, out: Path) -> None:
    """curves.png: per dataset, each column's IQM over seeds against updates with its 95% CI band;
    markers, so that a curve of one evaluation is a visible point."""
    plt, datasets = pyplot(), plot_datasets(cols)
    ncols = min(3, len(datasets))  # the thesis's 9 datasets: a 3 x 3 grid, not one 50-inch row
    nrows = -(-len(datasets) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(datasets) :]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, datasets):
        for i, (k, c) in enumerate(cols.items()):
            cv, st = c["curves"].get(d), style(i)  # a column's look: the same in every figure
            if cv and cv["steps"]:
                look = dict(color=st["color"], linestyle=st["linestyle"], marker="o", ms=3)
                ax.plot(cv["steps"], cv["iqm"], label=k, **look)
                ax.fill_between(cv["steps"], cv["lo"], cv["hi"], alpha=0.2, color=st["color"])
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("update")
        ax.set_ylabel("normalized score")
    # every column, once
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}
    axes[0, ncols - 1].legend(
        handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    fig.suptitle("evaluation score during training: IQM over seeds, 95% bootstrap CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def profile_scores(c: dict, rows: list[str]) -> np.ndarray:
    """A column's final scores on the rows it has: (runs, tasks) when every row has as many seeds,
    else all runs as one task (the profile is the same fraction; only the bootstrap's strata
    differ)."""
    per_row = [list(c["stats"][d]["per_seed"].values()) for d in rows if d in c["stats"]]
    if len({len(p) for p in per_row}) == 1:
        return np.array(per_row, float).T
    return np.concatenate(per_row).reshape(-1, 1)


def plot_profiles(cols: dict, tables: list[tuple], out: Path, reps: int) -> None:
    """performance_profile.png: per table, the fraction of each column's runs (its seeds on the
    table's rows) scoring above τ, with its 95% CI band (rliable's performance profile)."""
    from rliable import plot_utils

    library, _ = rliable()
    plt = pyplot()
    panels = [(title, *shown(cols, rows, methods, OWN[title])) for title, rows, methods in tables]
    panels = [(title, rows, chosen) for title, chosen, rows in panels if chosen]
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for ax, (title, rows, chosen) in zip(axes.flat, panels):
        scores = {k: profile_scores(c, rows) for k, c in chosen.items()}
        scores = {f"{k} (n={s.size})": s for k, s in scores.items()}  # the legend's labels
        colors = {lab: style(list(cols).index(k))["color"] for lab, k in zip(scores, chosen)}
        values = np.concatenate([s.ravel() for s in scores.values()])
        taus = np.linspace(min(0.0, values.min()), max(100.0, values.max()), 101)
        with seeded():
            profiles, cis = library.create_performance_profile(scores, taus, reps=reps)
        look = dict(colors=colors, ax=ax, labelsize="small", ticklabelsize="small")
        look |= dict(xlabel="normalized score τ", ylabel="fraction of runs with score > τ")
        plot_utils.plot_performance_profiles(profiles, taus, performance_profile_cis=cis, **look)
        ax.set_title(f"{title} layout: {', '.join(rows)} (95% CI bands)", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "performance_profile.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def check(args: Args) -> list[dict]:
    if not args.folders:
        raise SystemExit(
            "error: name at least one results folder, e.g. `python benchmarks/aggregate.py "
            "benchmarks/results/cpu`."
        )
    if args.reps < 1:
        raise SystemExit(f"error: --reps {args.reps}: must be >= 1 (resamples per CI; e.g. 2000).")
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        raise SystemExit(
            f"error: no such folder: {', '.join(missing)}; pass the --out folder of "
            "benchmarks/run.py."
        )
    results = load(args.folders)
    if not results:
        raise SystemExit(
            f"error: no benchmark results.json under {', '.join(args.folders)}; run "
            "benchmarks/run.py first."
        )
    rliable()  # a missing extra stops here, before anything is written
    return results


def main(args: Args) -> dict:
    results = check(args)
    out = Path(args.out or args.folders[0])
    made = [f for f in ("tables.md", "summary.json") if (out / f).exists()]
    # e.g. the committed tables of benchmarks/results/cpu: regenerated only on purpose
    if made and not args.force:
        raise SystemExit(
            f"error: {out} already holds {' and '.join(made)}; add --force to replace them with "
            "tables of these results, or pass --out NEW_FOLDER."
        )
    out.mkdir(parents=True, exist_ok=True)
    cols, history = columns(results, args.reps)
    title = "layout (normalized score, mean over seeds)"
    t13, tot13 = table(cols, TABLE_1_3, TABLE_1_3_METHODS, f"Table 1.3 {title}")
    # Table 2.1 is RGDT's table: without RGDT results it would only repeat Table 1.3's columns.
    has_rgdt = any(c["method"] == "rgdt" for c in cols.values())
    t21, tot21 = ("", {})
    if has_rgdt:
        t21, tot21 = table(cols, TABLE_2_1, TABLE_2_1_METHODS, f"Table 2.1 {title}")
    judged = orderings(cols, args.reps)
    text = "\n".join([x for x in (t13, t21) if x] + ordering_lines(judged) + history_lines(history))
    (out / "tables.md").write_text(text)
    totals = dict(table_1_3=tot13, table_2_1=tot21)
    summary = dict(columns=cols, history=history, orderings=judged, totals=totals)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_scores(cols, out)
    plot_curves(cols, out)
    tables = [("Table 1.3", TABLE_1_3, TABLE_1_3_METHODS)]
    tables += [("Table 2.1", TABLE_2_1, TABLE_2_1_METHODS)] if has_rgdt else []
    plot_profiles(cols, tables, out, args.reps)
    print(text)
    print(f"wrote {out / 'tables.md'}, summary.json, {', '.join(FIGURES)}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
