"""How many seeds would decide the orderings that ours leave "not decidable with these seeds"
(issue 26): a planning estimate from the seeds we have, not a result.

    python benchmarks/seeds_needed.py benchmarks/results/table13-hmr/summary.json --out DIR

For each ordering X > Y judged in an aggregate.py `summary.json`, it draws n runs of X and n runs
of Y with replacement from the observed final scores of each column, judges the draw with the
tables' own rule (claims.ordering_verdict: rliable's P(X > Y) and its 95% stratified-bootstrap CI),
repeats that --sims times per n, and reports the share of draws that come out "holds", "does not
hold" or "not decidable". The seeds needed: the smallest n of --n at which at least --power of the
draws decide (either way). The assumption is that further seeds score like the ones we have; with
five seeds per column that is rough (a resample never scores outside the observed range), so read
the answer as an order of magnitude. An ordering whose observed P(X > Y) is near 0.5 needs more
seeds than any n tried: the table says "more than N".

Writes seeds_needed.json (config, git commit, machine, wall time, per ordering and n the shares),
seeds_needed.md and seeds_needed.png (share of decided draws against n, one line per ordering).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tyro
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
from aggregate import pyplot  # noqa: E402
from claims import UNDECIDED, ordering_verdict, rliable  # noqa: E402
from run import cpu_model  # noqa: E402
from speed import git_commit  # noqa: E402


@dataclass
class Args:
    summary: tyro.conf.Positional[str]
    """summary.json written by benchmarks/aggregate.py (its columns' per-seed final scores and its
    orderings)"""
    out: Optional[str] = None
    """folder of seeds_needed.json/.md/.png (default: a new runs/seeds_needed__{time}); one that
    holds files only with --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    n: list[int] = field(default_factory=lambda: [5, 10, 15, 20, 30, 50])
    """seeds per column to try (each >= 2)"""
    sims: int = 100
    """simulated experiments per ordering and n (the share's resolution is 1/sims)"""
    reps: int = 500
    """bootstrap resamples inside each verdict (the tables use 2000; fewer keeps this in minutes)"""
    power: float = 0.8
    """share of simulated experiments that must reach a verdict for n seeds to count as enough"""
    seed: int = 0
    """seed of the resampling of scores (each verdict's bootstrap has its own fixed seed)"""


def observed(summary: dict) -> list[dict]:
    """The orderings of a summary that name a dataset, with both columns' per-seed final scores."""
    cols = summary["columns"]
    found = []
    for o in summary["orderings"]:
        if not o.get("dataset"):
            continue
        x_label, y_label = o["claim"].split(" > ")
        per_seed = [cols[c]["stats"][o["dataset"]]["per_seed"] for c in (x_label, y_label)]
        scores = [np.array(list(s.values()), dtype=float) for s in per_seed]
        found.append(
            dict(claim=o["claim"], dataset=o["dataset"], p=o["p"], x=scores[0], y=scores[1])
        )
    return found


def shares(x: np.ndarray, y: np.ndarray, n: int, sims: int, reps: int, rng) -> dict:
    """Share of `sims` experiments of n vs n seeds, drawn from the observed scores, per verdict."""
    counts = {"holds": 0, "does not hold": 0, UNDECIDED: 0}
    for _ in range(sims):
        v = ordering_verdict(rng.choice(x, n), rng.choice(y, n), reps=reps)["verdict"]
        counts[v if v in counts else UNDECIDED] += 1
    return {k: c / sims for k, c in counts.items()}


def needed(by_n: dict, power: float) -> Optional[int]:
    """Smallest n whose draws decide (either way) at least `power` of the time; None if none."""
    decided = [n for n, s in by_n.items() if 1 - s[UNDECIDED] >= power]
    return min(decided) if decided else None


def simulate(orderings: list[dict], args: Args) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    rows = []
    bar = tqdm(total=len(orderings) * len(args.n), desc="orderings x n", unit="n")
    for o in orderings:
        by_n = {}
        for n in args.n:
            by_n[n] = shares(o["x"], o["y"], n, args.sims, args.reps, rng)
            bar.update()
        seeds = [len(o["x"]), len(o["y"])]
        row = dict(claim=o["claim"], dataset=o["dataset"], observed_p=o["p"], seeds=seeds)
        rows.append(row | dict(shares=by_n, seeds_needed=needed(by_n, args.power)))
    bar.close()
    return rows


def markdown(rows: list[dict], args: Args) -> list[str]:
    head = "| ordering | dataset | seeds now | P(X > Y) now | "
    head += (
        " | ".join(f"holds / does not hold, n={n}" for n in args.n)
        + f" | seeds needed ({args.power:.0%}) |"
    )
    lines = [head, "|" + "---|" * (5 + len(args.n))]
    for r in rows:
        by_n = [r["shares"][n] for n in args.n]
        decided = [f"{s['holds']:.2f} / {s['does not hold']:.2f}" for s in by_n]
        need = r["seeds_needed"] or f"more than {max(args.n)}"
        seeds = " vs ".join(map(str, r["seeds"]))
        cells = [r["claim"], r["dataset"], seeds, f"{r['observed_p']:.2f}", *decided, str(need)]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"\nDraws of n vs n seeds from the observed final scores, {args.sims} per cell, each "
        f"judged by the tables' rule (P(X > Y), 95% CI, {args.reps} bootstrap resamples). "
        "Each cell: the share of draws that say holds / does not hold; the rest are not "
        "decidable. A planning estimate: it assumes further seeds score like the ones we have."
    )
    return lines + [note]


def plot(rows: list[dict], args: Args, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        decided = [1 - r["shares"][n][UNDECIDED] for n in args.n]
        label = f"{r['claim']} (P = {r['observed_p']:.2f} now)"
        ax.plot(args.n, decided, marker="o", label=label)
    ax.axhline(args.power, color="grey", linestyle="--", linewidth=1, label=f"power {args.power}")
    ax.set(xlabel="seeds per column (n)", ylabel="share of draws that decide", ylim=(-0.02, 1.02))
    ax.set_title(
        f"Seeds needed to decide (draws from {Path(args.summary).parent.name})", fontsize=10
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check(args: Args) -> dict:
    """One line per bad input, before anything is written."""
    path = Path(args.summary)
    if not path.is_file():
        raise SystemExit(f"error: {args.summary}: no such file; pass aggregate.py's summary.json")
    try:
        summary = json.loads(path.read_text())
        summary["columns"], [o["p"] for o in summary["orderings"] if o.get("dataset")]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SystemExit(
            f"error: {args.summary}: not a summary.json of benchmarks/aggregate.py (no columns "
            "and judged orderings); pass the one aggregate.py wrote"
        ) from None
    if not args.n or min(args.n) < 2:
        raise SystemExit(f"error: --n {args.n}: each must be >= 2 seeds; e.g. --n 5 10 20")
    for flag, value in (("--sims", args.sims), ("--reps", args.reps)):
        if value < 1:
            raise SystemExit(f"error: {flag} {value}: must be >= 1")
    if not 0 < args.power <= 1:
        raise SystemExit(f"error: --power {args.power}: must be in (0, 1]; e.g. 0.8")
    rliable()  # a missing extra stops here, before anything is written
    return summary


def main(args: Args) -> dict:
    summary = check(args)
    orderings = observed(summary)
    if not orderings:
        raise SystemExit(f"error: {args.summary}: no ordering has results of both columns")
    out = common.output_folder(args.out, "seeds_needed", args.force)
    start = time.time()
    rows = simulate(orderings, args)
    machine = dict(cpu=cpu_model(), python=platform.python_version())
    report = dict(config=asdict(args), commit=git_commit(), machine=machine, rows=rows)
    report["wall_s"] = round(time.time() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds_needed.json").write_text(json.dumps(report, indent=1) + "\n")
    table = "\n".join(markdown(rows, args))
    (out / "seeds_needed.md").write_text(table + "\n")
    plot(rows, args, out / "seeds_needed.png")
    print(table)
    print(f"wrote {out}/seeds_needed.json, .md, .png")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
