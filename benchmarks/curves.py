"""Learning curves from run folders, finished or not: evaluation score and training loss against updates.

    python benchmarks/curves.py "DT=runs/RUN_A" "MO-DT=runs/RUN_B" --out curves

Reads each run's metrics.jsonl, which every method file writes line by line, so a run stopped by a time limit
or Ctrl-C still gives its curve up to where it stopped (the aggregator, benchmarks/aggregate.py, reads only
finished runs' results.json). A folder may be a run folder or any folder holding exactly one metrics.jsonl
below it (a benchmarks/run.py job folder). Writes curves.json (every evaluation, and final and best score
per run), curves.md (that table) and curves.png into --out, never overwriting, and prints the table.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from attention import pyplot  # noqa: E402

OUTPUTS = ("curves.json", "curves.md", "curves.png")


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """`label=folder` pairs; the folder is a run folder or holds exactly one metrics.jsonl below it"""
    out: str = "curves"
    """output folder (created; existing files are never overwritten)"""
    title: str = ""
    """figure title (e.g. the data and the preset)"""


def find_metrics(item: str) -> tuple[str, Path]:
    label, sep, where = item.partition("=")
    if not sep or not label or not where:
        raise SystemExit(f"error: {item!r}: expected label=folder, e.g. DT=runs/hopper-medium-replay__dt__0__1.")
    found = sorted(Path(where).rglob("metrics.jsonl")) if Path(where).is_dir() else []
    if len(found) != 1:
        what = "no metrics.jsonl" if not found else f"{len(found)} metrics.jsonl files"
        raise SystemExit(f"error: {item!r}: {what} under {where}; name one run folder.")
    return label, found[0]


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
        raise SystemExit(f"error: {metrics}: no evaluation logged yet (eval_normalized); nothing to plot.")
    config = (
        json.loads((metrics.parent / "config.json").read_text()) if (metrics.parent / "config.json").is_file() else {}
    )
    run_args = config.get("args", {})
    best = max(evals, key=lambda e: e[1])
    return dict(label=label, folder=str(metrics.parent), method=config.get("method"), dataset=run_args.get("env"),
                updates_planned=run_args.get("updates"), finished=(metrics.parent / "results.json").is_file(),
                evals=[dict(step=s, normalized=m, normalized_std=sd) for s, m, sd in evals],
                losses=[dict(step=s, loss=v) for s, v in losses],
                final=dict(step=evals[-1][0], normalized=evals[-1][1]),
                best=dict(step=best[0], normalized=best[1]))  # fmt: skip


def table(runs: list[dict]) -> str:
    head = "| run | method | data | last update logged | final score | best score (at update) | finished |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in runs:
        last = max([e["step"] for e in r["evals"]] + [e["step"] for e in r["losses"]])
        lines.append(f"| {r['label']} | {r['method'] or '—'} | {r['dataset']} | {last} of {r['updates_planned']} | "
                     f"{r['final']['normalized']:.1f} (at {r['final']['step']}) | {r['best']['normalized']:.1f} "
                     f"({r['best']['step']}) | {'yes' if r['finished'] else 'no (stopped)'} |")  # fmt: skip
    return "\n".join(lines)


def main(args: Args) -> dict:
    if not args.runs:
        raise SystemExit("error: name at least one label=folder.")
    pairs = [find_metrics(item) for item in args.runs]
    out = Path(args.out)
    if any((out / n).exists() for n in OUTPUTS):
        raise SystemExit(f"error: {out} already holds curves; choose another --out (nothing is overwritten).")
    runs = [read_run(label, path) for label, path in pairs]
    out.mkdir(parents=True, exist_ok=True)
    md = table(runs)
    print(md)
    (out / "curves.md").write_text(md + "\n")
    (out / "curves.json").write_text(json.dumps(dict(config=vars(args), runs=runs), indent=1))
    plt = pyplot()
    fig, (ax, lx) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        s, m, sd = (np.array([e[k] for e in r["evals"]]) for k in ("step", "normalized", "normalized_std"))
        (line,) = ax.plot(s, m, marker="o", ms=3, label=r["label"])
        ax.fill_between(s, m - sd, m + sd, color=line.get_color(), alpha=0.15)  # spread over the episodes
        if r["losses"]:
            lx.plot([e["step"] for e in r["losses"]], [e["loss"] for e in r["losses"]], color=line.get_color(), lw=1)
    ax.set_xlabel("update")
    ax.set_ylabel("normalized score (band: std over episodes)")
    ax.legend(fontsize=7)
    lx.set_xlabel("update")
    lx.set_ylabel("training loss (the method's own)")
    lx.set_yscale("symlog")
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return dict(runs=runs)


if __name__ == "__main__":
    main(tyro.cli(Args))
