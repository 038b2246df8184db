"""How a trained DT / MO-DT / TRDT checkpoint's score depends on the target return it is conditioned
on.

    python benchmarks/target_sweep.py dt=runs/RUN --targets 3600 3115 2500 1800 --out sweep

Each checkpoint is evaluated with its own method file's `evaluate` (all episodes at once, the
method's seeds) at every target. The question it answers: is a score that falls during training a
property of the model, or of a target return the data never reached (hopper-medium-replay's replica
tops out at 3115; DT's default is 3600)? Writes target_sweep.json and target_sweep.png into --out
(default: a new runs/target_sweep__{time}; a folder that already holds files only with --force) and
prints a table.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
from attention import MODELS, pyplot  # noqa: E402


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """`method=run_folder` (or `method=model.pt`) pairs, method one of dt, mo_dt, trdt"""
    targets: tuple[float, ...] = (3600.0, 3115.0, 2500.0, 1800.0)
    """target returns to condition on (environment units, before the return scale)"""
    eval_episodes: int = 10
    """episodes per target, all at once"""
    out: Optional[str] = None
    """output folder (default: a new runs/target_sweep__{unix time}); one that holds files only with
    --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    seed: int = 0
    """seed of the evaluation envs (the method file's rule: seed + 10000 + episode)"""


def sweep(method: str, checkpoint: Path, targets, episodes: int, seed: int) -> dict:
    mod = importlib.import_module(method)
    dev = torch.device("cpu")
    ckpt = mod.load_checkpoint(str(checkpoint), dev)
    model = getattr(mod, MODELS[method])(**ckpt["arch"])
    model.load_state_dict(ckpt["model"])
    args = mod.Args(checkpoint=str(checkpoint), updates=0, eval_episodes=episodes, seed=seed)
    stats = (ckpt["state_mean"].numpy(), ckpt["state_std"].numpy())
    off = torch.autocast("cpu", enabled=False)
    rows = []
    for target in targets:
        res = mod.evaluate(model, ckpt["dataset"], stats, args, target, dev, off)
        score = {k: res[k] for k in ("normalized_mean", "normalized_std", "return_mean", "lengths")}
        rows.append(dict(target=target, **score))
        shown = f"{res['normalized_mean']:.1f} ± {res['normalized_std']:.1f}"
        print(f"{method} ({checkpoint.parent.name}), target {target:g}: {shown} "
              f"(return {res['return_mean']:.0f})")  # fmt: skip
    return dict(method=method, checkpoint=str(checkpoint), trained_updates=ckpt["trained_updates"],
                dataset=ckpt["dataset"]["name"], source=ckpt["dataset"]["source"],
                rows=rows)  # fmt: skip


def main(args: Args) -> dict:
    if not args.targets or not all(np.isfinite(t) for t in args.targets):
        raise SystemExit(
            "error: --targets: pass one or more finite returns, e.g. --targets 3600 2500."
        )
    pairs = []
    for item in args.runs:
        method, _, where = item.partition("=")
        path = Path(where) / "model.pt" if Path(where).is_dir() else Path(where)
        if method not in MODELS or not path.is_file():
            raise SystemExit(
                f"error: {item!r}: expected method=run_folder (dt, mo_dt, trdt) with a model.pt."
            )
        pairs.append((method, path))
    if not pairs:
        raise SystemExit(
            "error: no checkpoint given; pass method=run_folder pairs, e.g. dt=runs/RUN."
        )
    out = common.output_folder(args.out, "target_sweep", args.force)
    results = [sweep(m, p, args.targets, args.eval_episodes, args.seed) for m, p in pairs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "target_sweep.json").write_text(
        json.dumps(dict(config=vars(args), results=results), indent=1)
    )
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in results:
        t = [row["target"] for row in r["rows"]]
        m, s = (
            np.array([row["normalized_mean"] for row in r["rows"]]),
            [row["normalized_std"] for row in r["rows"]],
        )
        ax.errorbar(
            t,
            m,
            yerr=s,
            marker="o",
            capsize=3,
            label=f"{r['method']}, {r['trained_updates']} updates",
        )
    ax.set_xlabel("target return (conditioning)")
    ax.set_ylabel(f"normalized score ({results[0]['source']} data)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "target_sweep.png", dpi=110)
    plt.close(fig)
    return dict(results=results)


if __name__ == "__main__":
    main(tyro.cli(Args))
