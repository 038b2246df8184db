"""Learning curves from run folders, finished or not: evaluation score and training loss against
updates.

    python benchmarks/curves.py "DT=runs/RUN_A" "MO-DT=runs/RUN_B" --out curves
    python benchmarks/curves.py "DT=results/dt__s0" "DT=results/dt__s1" --out curves   # 2 seeds

Reads each run's metrics.jsonl, which every method file writes line by line, so a run stopped by
a time limit or Ctrl-C still gives its curve up to where it stopped (the aggregator,
benchmarks/aggregate.py, reads only finished runs' results.json). A folder may be a run folder or
any folder with metrics.jsonl files below it (benchmarks/run.py job folders): each metrics.jsonl
is one run, and the runs of one label (a folder holding several, or the label given more than
once) are the seeds of one method on one dataset. A label with several seeds is drawn as the IQM
over them at the updates all of them evaluated, with its 95% stratified-bootstrap CI as a band
(rliable: pip install -e ".[stats]"); a label with one run as that run's curve, its band the std
over evaluation episodes. Writes curves.json (every evaluation, final and best score per run, the
curve per label), curves.md (the tables) and curves.png into --out, never overwriting, and prints
the tables.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from aggregate import ci_text, interval, iqm_curve, pyplot, style  # noqa: E402

OUTPUTS = ("curves.json", "curves.md", "curves.png")


@dataclass
class Args:
    """Learning curves of finished or stopped runs from their metrics.jsonl: per label the IQM over
    its seeds with a 95% bootstrap CI band (one run: its curve, band the std over episodes), the
    training loss beside; a table of every run and of each label's final and last-three IQM."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """`label=folder` pairs; each metrics.jsonl below a folder is a run; a label's runs are seeds"""
    out: str = "curves"
    """output folder (created; existing files are never overwritten)"""
    title: str = ""
    """figure title (e.g. the data and the preset)"""
    reps: int = 2000
    """bootstrap resamples per confidence interval of a label with several seeds (fixed seed)"""


def find_metrics(item: str) -> tuple[str, list[Path]]:
    label, sep, where = item.partition("=")
    if not sep or not label or not where:
        raise SystemExit(
            f"error: {item!r}: expected label=folder, e.g. DT=runs/hopper-medium-replay__dt__0__1."
        )
    found = sorted(Path(where).rglob("metrics.jsonl")) if Path(where).is_dir() else []
    # a finished run.py job folder holds its run's metrics.jsonl twice: its own copy and runs/RUN/'s
    found = [p for p in found if not any(q.parent / "runs" in p.parents for q in found)]
    if not found:
        hint = "name a run folder or a benchmarks/run.py job folder"
        raise SystemExit(f"error: {item!r}: no metrics.jsonl under {where}; {hint}.")
    return label, found


def read_run(label: str, metrics: Path) -> dict:
    evals, losses = [], []
    for n, line in enumerate(metrics.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves at most its last line cut
            print(f"warning: {metrics}: line {n} is not JSON (cut by a kill?); skipped")
            continue
        if "eval_normalized" in row:
            evals.append((row["step"], row["eval_normalized"], row.get("eval_normalized_std", 0.0)))
        elif "loss" in row:
            losses.append((row["step"], row["loss"]))
    if not evals:
        raise SystemExit(
            f"error: {metrics}: no evaluation logged yet (eval_normalized); nothing to plot."
        )
    # the run's flags: its config.json, or the results.json that repeats them (all a job folder has)
    found = [metrics.parent / n for n in ("config.json", "results.json")]
    found = [f for f in found if f.is_file()]
    config = json.loads(found[0].read_text()) if found else {}
    run_args = config.get("args", {})
    best = max(evals, key=lambda e: e[1])
    return dict(label=label, folder=str(metrics.parent), method=config.get("method"),
                dataset=run_args.get("env"), seed=run_args.get("seed"),
                updates_planned=run_args.get("updates"),
                finished=(metrics.parent / "results.json").is_file(),
                evals=[dict(step=s, normalized=m, normalized_std=sd) for s, m, sd in evals],
                losses=[dict(step=s, loss=v) for s, v in losses],
                final=dict(step=evals[-1][0], normalized=evals[-1][1]),
                best=dict(step=best[0], normalized=best[1]))  # fmt: skip


def group(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs by label; the runs of one label must be one method on one dataset, each seed once (they
    are its seeds), and each run gets its seed in its row's name."""
    by_label = defaultdict(list)
    for r in runs:
        by_label[r["label"]].append(r)
    for label, rs in by_label.items():
        for key in ("method", "dataset"):
            values = sorted({str(r[key]) for r in rs if r[key] is not None})
            if len(values) > 1:
                mixed = f"error: label {label!r} mixes {key}s {', '.join(values)}"
                raise SystemExit(f"{mixed}; give each its own label.")
        seeds = [r["seed"] for r in rs if r["seed"] is not None]
        if len(seeds) != len(set(seeds)):
            twice = sorted({s for s in seeds if seeds.count(s) > 1})
            again = f"error: label {label!r} has seed {twice[0]} twice (two attempts of one run?)"
            raise SystemExit(f"{again}; name the run folders one by one.")
        if len(rs) > 1:
            for i, r in enumerate(rs):
                r["row"] = f"{label}, seed {r['seed'] if r['seed'] is not None else f'#{i}'}"
    return dict(by_label)


def summarize(rs: list[dict], reps: int) -> dict:
    """A label's seeds: IQM of their final evaluations and of their last-three means (95% CIs
    when several), and the IQM curve over them."""
    final = [r["final"]["normalized"] for r in rs]
    last3 = [float(np.mean([e["normalized"] for e in r["evals"][-3:]])) for r in rs]
    if len(rs) == 1:
        one = lambda v: dict(point=v[0], lo=v[0], hi=v[0])  # noqa: E731
        return dict(n=1, final_iqm_ci=one(final), last3_iqm_ci=one(last3), curve=None)
    per_seed = [{e["step"]: e["normalized"] for e in r["evals"]} for r in rs]
    final, last3 = interval(final, "iqm", reps), interval(last3, "iqm", reps)
    return dict(n=len(rs), final_iqm_ci=final, last3_iqm_ci=last3, curve=iqm_curve(per_seed, reps))


def table(runs: list[dict], labels: dict[str, dict]) -> str:
    head = (
        "| run | method | data | last update logged | final score | best score (at update) "
        "| finished |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in runs:
        last = max([e["step"] for e in r["evals"]] + [e["step"] for e in r["losses"]])
        final, best = r["final"], r["best"]
        cells = [r.get("row", r["label"]), r["method"] or "—", str(r["dataset"])]
        cells.append(f"{last} of {r['updates_planned']}")
        cells.append(f"{final['normalized']:.1f} (at {final['step']})")
        cells.append(f"{best['normalized']:.1f} ({best['step']})")
        cells.append("yes" if r["finished"] else "no (stopped)")
        lines.append("| " + " | ".join(cells) + " |")
    head = "| label | seeds | final evaluation: IQM [95% CI] | last 3 evaluations: IQM [95% CI] |"
    lines += ["", head]
    lines.append("|---|---|---|---|")
    for label, s in labels.items():
        cis = f"{ci_text(s['final_iqm_ci'])} | {ci_text(s['last3_iqm_ci'])}"
        lines.append(f"| {label} | {s['n']} | {cis} |")
    return "\n".join(lines)


def plot(by_label: dict, labels: dict, args: Args, out: Path) -> None:
    """Left: per label the IQM over seeds with its 95% CI band (one run: its curve, band the std
    over episodes); right: every run's training loss in its label's colour. Markers, so that one
    evaluation is a visible point."""
    plt = pyplot()
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, rs) in enumerate(by_label.items()):
        st, cv = style(i), labels[label]["curve"]
        if cv:
            s, m, lo, hi = cv["steps"], cv["iqm"], cv["lo"], cv["hi"]
            name = f"{label} (IQM of {cv['n']} seeds, 95% CI)"
        else:
            keys = ("step", "normalized", "normalized_std")
            s, m, sd = (np.array([e[k] for e in rs[0]["evals"]]) for k in keys)
            lo, hi, name = m - sd, m + sd, f"{label} (1 run, band: std over episodes)"
        ax.plot(s, m, marker="o", ms=3, label=name, color=st["color"], linestyle=st["linestyle"])
        ax.fill_between(s, lo, hi, color=st["color"], alpha=0.15)
        for r in rs:
            if r["losses"]:
                steps, loss = [e["step"] for e in r["losses"]], [e["loss"] for e in r["losses"]]
                dot = "o" if len(steps) == 1 else None
                lx.plot(steps, loss, color=st["color"], lw=1, marker=dot)
    ax.set_xlabel("update")
    ax.set_ylabel("normalized score")
    ax.legend(fontsize=7)
    lx.set_xlabel("update")
    lx.set_ylabel("training loss (the method's own)")
    lx.set_yscale("symlog")
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def main(args: Args) -> dict:
    if not args.runs:
        raise SystemExit("error: name at least one label=folder.")
    if args.reps < 1:
        raise SystemExit(f"error: --reps {args.reps}: must be >= 1 (resamples per CI; e.g. 2000).")
    pairs = [find_metrics(item) for item in args.runs]
    out = Path(args.out)
    if any((out / n).exists() for n in OUTPUTS):
        raise SystemExit(
            f"error: {out} already holds curves; choose another --out (nothing is overwritten)."
        )
    runs = [read_run(label, path) for label, paths in pairs for path in paths]
    by_label = group(runs)
    labels = {label: summarize(rs, args.reps) for label, rs in by_label.items()}
    out.mkdir(parents=True, exist_ok=True)
    md = table(runs, labels)
    print(md)
    (out / "curves.md").write_text(md + "\n")
    summary = dict(config=vars(args), runs=runs, labels=labels)
    (out / "curves.json").write_text(json.dumps(summary, indent=1))
    plot(by_label, labels, args, out)
    return dict(runs=runs, labels=labels)


if __name__ == "__main__":
    main(tyro.cli(Args))
