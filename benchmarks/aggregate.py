"""Turn benchmark results into the thesis's tables (Table 1.3, Table 2.1), a bar chart and learning curves.

    python benchmarks/aggregate.py benchmarks/results/cpu [more folders ...]

Reads every `*/results.json` that benchmarks/run.py wrote. Seeds are averaged only within one config
(same command but for the seed, same code, same data source): two configs of a method become two columns,
never one mean. ± is the standard deviation over seeds (numpy's default, ddof=0) of each seed's mean
normalized score.
Each column states its provenance (data source, updates, seeds, device, commit), and the thesis's
published numbers stand beside ours. BC and 10%BC (benchmarks/bc.py), measured on the same data, stand in
Table 1.3's layout, and 10%BC in Table 2.1's, beside the thesis's quoted BC / 10% BC columns, as in the thesis.
Writes tables.md, summary.json, scores.png and curves.png.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from claims import PRINTED_TOTALS, SOURCE_LABEL, TABLE_1_3, TABLE_2_1, THESIS, THESIS_STD  # noqa: E402
from claims import differences, verdict  # noqa: E402
from run import METHODS  # noqa: E402


@dataclass
class Args:
    """Tables 1.3 / 2.1 layout (mean ± std over seeds, thesis numbers beside, provenance), scores.png and
    curves.png from the results folders of benchmarks/run.py."""

    folders: tyro.conf.Positional[tuple[str, ...]]
    """results folders written by benchmarks/run.py"""
    out: str = ""
    """where to write tables.md, summary.json and the PNGs (default: the first folder)"""


def load(folders) -> list[dict]:
    results = []
    for folder in folders:
        for f in sorted(Path(folder).glob("*/results.json")):
            r = json.loads(f.read_text())
            if "benchmark" not in r:
                continue
            r["_folder"] = str(f.parent)
            results.append(r)
    return results


def config_flags(r: dict) -> list[str]:
    """The job's command without seed and dataset (--seed, --env, --dataset-path and their values), plus
    the data source as a pseudo-flag `--data`: runs on the replica and on official D4RL never share a mean."""
    kept, skip = [], False
    for tok in r["benchmark"]["cmd"]:
        if tok.startswith("--"):
            skip = tok in ("--seed", "--env", "--dataset-path")
        if not skip:
            kept.append(tok)
    return kept + ["--data", r["dataset"]["source"]]


def config_id(r: dict) -> str:
    """Hash of config_flags plus the code hash: what must be equal for seeds to be averaged and datasets
    to share a column."""
    key = dict(cmd=config_flags(r), code=r["benchmark"]["code_sha256"])
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:8]


def variant_label(flags: list[str], siblings: list[list[str]]) -> str:
    """How one config of a method differs from its siblings, for a column label a reader can parse: the
    flags (with values) not shared by every sibling, e.g. '--lr 1e-3'; 'defaults' when it only lacks
    flags the others set. Configs that differ only in code get their config id in columns()."""

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


def columns(results: list[dict]) -> dict:
    """{(method, config): {dataset: [results over seeds]}}; the column label gains the config id only
    when a method has more than one config."""
    cols = defaultdict(lambda: defaultdict(list))
    for r in results:
        cols[(r["benchmark"]["method"], config_id(r))][r["benchmark"]["dataset"]].append(r)
    flags = {key: config_flags(next(iter(by_ds.values()))[0]) for key, by_ds in cols.items()}
    out = {}
    for (m, cid), by_ds in sorted(cols.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), kv[0][1])):
        siblings = {c: f for (m2, c), f in flags.items() if m2 == m}
        label = METHODS[m]["label"]
        if len(siblings) > 1:
            variant = variant_label(flags[(m, cid)], list(siblings.values()))
            if any(variant_label(f, list(siblings.values())) == variant for c, f in siblings.items() if c != cid):
                variant += f", code {cid}"
            label += f" [{variant}]"
        stats = {}
        for d, rs in by_ds.items():
            seed_means = np.array([r["normalized_mean"] for r in rs])
            per_seed = {r["benchmark"]["seed"]: r["normalized_mean"] for r in rs}
            stats[d] = dict(
                mean=float(seed_means.mean()),
                std=float(seed_means.std()),
                n=len(rs),
                seeds=sorted(per_seed),
                per_seed=per_seed,
                provenance=provenance(rs),
                differs_from_thesis=differences(rs[0]),
            )
        out[label] = dict(
            method=m,
            config=cid,
            provenance=provenance([r for rs in by_ds.values() for r in rs], by_ds),
            stats=stats,
            curves={d: curve(rs) for d, rs in by_ds.items()},
        )
    # Within a method: the defaults first, then the variants by label (not by hash: a stable, readable order).
    return dict(
        sorted(out.items(), key=lambda kv: (list(METHODS).index(kv[1]["method"]), "[defaults" not in kv[0], kv[0]))
    )


def provenance(runs: list[dict], by_ds: dict | None = None) -> dict:
    """Where numbers come from: data source, updates, seeds per dataset, device, commit, wall time."""
    walls = [r["wall_time_s"] for r in runs if "wall_time_s" in r]
    return dict(
        data=sorted({SOURCE_LABEL.get(r["dataset"]["source"], r["dataset"]["source"]) for r in runs}),
        updates=sorted({r["updates"] for r in runs}),
        seeds=sorted({len(rs) for rs in by_ds.values()}) if by_ds else [len(runs)],
        device=sorted({r["device"] for r in runs}),
        commit=sorted({(r.get("git_commit") or "unknown")[:10] for r in runs}),
        wall_min_per_seed=[round(float(np.median(walls)) / 60, 1)] if walls else [],
    )


def curve(rs: list[dict]):
    """Mean and std over seeds of the evaluation score at each logged update (from metrics.jsonl)."""
    per_seed = []
    for r in rs:
        path = Path(r["_folder"]) / "metrics.jsonl"
        if path.exists():
            pts = {}
            for line in path.read_text().splitlines():
                m = json.loads(line)
                if "eval_normalized" in m:
                    pts[m["step"]] = m["eval_normalized"]
            per_seed.append(pts)
    steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    vals = np.array([[p[s] for s in steps] for p in per_seed]) if steps else np.zeros((0, 0))
    return dict(steps=steps, mean=vals.mean(0).tolist() if steps else [], std=vals.std(0).tolist() if steps else [])


# Each table's columns in the thesis's order, its quoted baselines first.
TABLE_1_3_METHODS = ("bc", "bc-10", "dt", "dt-gaussian", "mo_dt", "trdt")
TABLE_2_1_METHODS = ("bc-10", "rgdt")


def printed_total(method: str, datasets: list[str]) -> str:
    """The thesis's printed total of a column. The quoted baselines print the sum of their rows (BC 466.7 and
    10% BC 666.2 in Table 1.3, 10% BC 487.2 over Table 2.1's six rows), so theirs is that sum."""
    if method in PRINTED_TOTALS:
        return str(PRINTED_TOTALS[method])
    return f"{sum(THESIS[method][d] for d in datasets if d in THESIS[method]):.1f}"


def table(cols: dict, datasets: list[str], methods: tuple[str, ...], title: str) -> tuple[str, dict]:
    """Markdown table: per column ours (mean ± std over seeds, n) | thesis; totals over the rows where we
    have a number, the thesis's total over the same rows, and the thesis's printed total."""
    chosen = {k: v for k, v in cols.items() if v["method"] in methods}
    # The table's own rows first, then any other dataset these methods were run on (thesis column "—").
    rows = [d for d in datasets if any(d in c["stats"] for c in chosen.values())]
    rows += sorted({d for c in chosen.values() for d in c["stats"]} - set(rows))
    if not chosen or not rows:
        return "", {}
    head = "| dataset | " + " | ".join(f"{k} (ours) | {k} (thesis)" for k in chosen) + " |"
    lines = [f"### {title}", "", head, "|---" * (1 + 2 * len(chosen)) + "|"]
    totals = {k: [0.0, 0.0, 0] for k in chosen}
    for d in rows:
        cells = []
        for k, c in chosen.items():
            s, t, t_std = c["stats"].get(d), THESIS[c["method"]].get(d), THESIS_STD.get(c["method"], {}).get(d)
            cells.append(f"{s['mean']:.1f} ± {s['std']:.1f} (n={s['n']})" if s else "—")
            cells.append("—" if t is None else f"{t:.2f}" + (f" ± {t_std:.2f}" if t_std is not None else ""))
            if s and t is not None:
                totals[k][0] += s["mean"]
                totals[k][1] += t
                totals[k][2] += 1
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append(
        "| **total** (same rows) | "
        + " | ".join(f"{v[0]:.1f} | {v[1]:.2f}" if v[2] else "— | —" for v in totals.values())
        + " |"
    )
    lines.append(
        "| thesis's printed total (all rows) | "
        + " | ".join(f"— | {printed_total(c['method'], datasets)}" for c in chosen.values())
        + " |"
    )
    lines += ["", "Verdicts (the rule of benchmarks/claims.py; where the thesis prints no ± our spread over seeds):"]
    for k, c in chosen.items():
        for d in rows:
            s, t = c["stats"].get(d), THESIS[c["method"]].get(d)
            if s and t is not None:
                std = THESIS_STD.get(c["method"], {}).get(d, s["std"])
                judged = (
                    verdict(s["mean"], t, std)
                    if not s["differs_from_thesis"]
                    else ("not comparable: differs in " + ", ".join(s["differs_from_thesis"]))
                )
                data = ", ".join(s["provenance"]["data"])
                lines.append(f"- {k}, {d}: ours {s['mean']:.1f} vs thesis {t}: {judged} ({data} data)")
    lines += ["", "Provenance:"]
    for k, c in chosen.items():
        p = c["provenance"]
        lines.append(
            f"- {k}: data {', '.join(p['data'])}; updates {p['updates']}; seeds per dataset {p['seeds']}; "
            f"device {', '.join(p['device'])}; commit {', '.join(p['commit'])}; config {c['config']}"
            + (f"; wall time per seed {p['wall_min_per_seed'][0]} min (median)" if p["wall_min_per_seed"] else "")
        )
    lines.append("")
    return "\n".join(lines), {
        k: dict(ours_total=v[0], thesis_total_same_rows=v[1], rows=v[2]) for k, v in totals.items()
    }


def plots(cols: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [
        d
        for d in TABLE_1_3 + [x for x in TABLE_2_1 if x not in TABLE_1_3]
        if any(d in c["stats"] for c in cols.values())
    ]
    datasets += sorted({d for c in cols.values() for d in c["stats"]} - set(datasets))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(datasets) * max(1, len(cols)) / 3), 4))
    w = 0.8 / max(1, len(cols))
    for i, (k, c) in enumerate(cols.items()):
        x = np.arange(len(datasets)) + i * w
        ours = [c["stats"].get(d, {}).get("mean", np.nan) for d in datasets]
        err = [c["stats"].get(d, {}).get("std", 0) for d in datasets]
        ax.bar(x, ours, w, yerr=err, capsize=2, label=f"{k} (ours)", color=f"C{i}")
        ax.scatter(x, [THESIS[c["method"]].get(d, np.nan) for d in datasets], marker="_", s=200, color="k", zorder=3)
    ax.scatter([], [], marker="_", s=200, color="k", label="thesis (official D4RL)")
    ax.set_xticks(np.arange(len(datasets)) + 0.4 - w / 2, datasets, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("normalized score (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: never over a bar
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    ncols = min(3, len(datasets))  # the thesis's 9 datasets: a 3 x 3 grid, not one 50-inch row
    nrows = -(-len(datasets) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(datasets) :]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, datasets):
        for i, (k, c) in enumerate(cols.items()):
            cv = c["curves"].get(d)
            if cv and cv["steps"]:
                m, s = np.array(cv["mean"]), np.array(cv["std"])
                ax.plot(cv["steps"], m, label=k, color=f"C{i}")  # a column's colour in every panel and in scores.png
                ax.fill_between(cv["steps"], m - s, m + s, alpha=0.2, color=f"C{i}")
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("update")
        ax.set_ylabel("normalized score")
    handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels())}  # every column, once
    axes[0, ncols - 1].legend(
        handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    fig.suptitle("evaluation score during training, mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(args: Args) -> dict:
    if not args.folders:
        raise SystemExit(
            "error: name at least one results folder, e.g. `python benchmarks/aggregate.py benchmarks/results/cpu`."
        )
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        raise SystemExit(f"error: no such folder: {', '.join(missing)}; pass the --out folder of benchmarks/run.py.")
    results = load(args.folders)
    if not results:
        raise SystemExit(
            f"error: no benchmark results.json under {', '.join(args.folders)}; run benchmarks/run.py first."
        )
    out = Path(args.out or args.folders[0])
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(results)
    t13, tot13 = table(cols, TABLE_1_3, TABLE_1_3_METHODS, "Table 1.3 layout (normalized score, mean ± std over seeds)")
    # Table 2.1 is RGDT's table: without RGDT results it would only repeat Table 1.3's 10%BC column.
    has_rgdt = any(c["method"] == "rgdt" for c in cols.values())
    title_2_1 = "Table 2.1 layout (normalized score, mean ± std over seeds)"
    t21, tot21 = table(cols, TABLE_2_1, TABLE_2_1_METHODS, title_2_1) if has_rgdt else ("", {})
    text = "\n".join(x for x in (t13, t21) if x)
    (out / "tables.md").write_text(text)
    summary = dict(
        columns={k: {kk: vv for kk, vv in c.items()} for k, c in cols.items()},
        totals=dict(table_1_3=tot13, table_2_1=tot21),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plots(cols, out)
    print(text)
    print(f"wrote {out / 'tables.md'}, summary.json, scores.png, curves.png")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
