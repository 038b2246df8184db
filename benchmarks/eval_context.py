"""How a trained DT / MO-DT / TRDT checkpoint's score depends on the context it evaluates with
(thesis §1.3.2: the context "may be shorter during evaluation than the one used during training";
the ODT code evaluates with 5).

    python benchmarks/eval_context.py dt=runs/RUN trdt=runs/RUN2 --contexts 1 2 5 10 20

Each checkpoint is evaluated with its own method file's evaluate() and `--eval-context K'` at every
K' of --contexts up to its training context K (K itself always included), on the same env seeds,
conditioned on the target return it was trained with. Writes eval_context.json and eval_context.png
(score against K', bars: the spread over episodes) into --out (default: a new
runs/eval_context__{time}; a folder that already holds files only with --force), prints a table and
one sentence per checkpoint with a verdict on "a shorter evaluation context hurts", by
benchmarks/attention.py's rule: the drop from K to the shortest K' (per episode: the episodes are
paired, same seeds) is set against random-init controls' drops (the model class constructed fresh,
never trained, evaluated the same way). It holds if ours drops more than the controls (and than one
normalized point) by two standard deviations (episodes and control seeds), does not hold if it drops
less than them by more than those two standard deviations, and is not decidable at this budget in
between.
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
from attention import CONTROL_SEED, MODELS, UNDECIDED, beyond_control, pyplot, random_init  # noqa: E402

# "Hurts" means a drop of at least one normalized point (a hundredth of the random-to-expert range):
# a stated floor, since a near-deterministic policy's paired episodes can differ by the same small
# amount every time.
MIN_DROP = 1.0


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """`method=run_folder` (or `method=model.pt`) pairs, method one of dt, mo_dt, trdt"""
    contexts: tuple[int, ...] = (1, 2, 5, 10, 20)
    """evaluation contexts K' to try; those above a checkpoint's K are left out for it, K is always
    added"""
    eval_episodes: int = 10
    """episodes per K', all at once (the same env seeds at every K')"""
    out: Optional[str] = None
    """output folder (default: a new runs/eval_context__{unix time}); one that holds files only with
    --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    seed: int = 0
    """seed of the evaluation envs (the method file's rule: seed + 10000 + episode)"""
    controls: int = 3
    """random-init controls per checkpoint (weights from seeds 1000, 1001, ...), evaluated at the
    shortest K' and at K: their drops' seed-to-seed spread is the verdict's noise margin"""
    device: str = "cpu"
    """device for the evaluation forwards"""

    def __post_init__(self):
        if not self.contexts or min(self.contexts) < 1:
            raise SystemExit(
                f"error: --contexts {self.contexts}: pass one or more contexts >= 1, "
                "e.g. 1 2 5 10 20."
            )
        for name in ("eval_episodes", "controls"):
            if getattr(self, name) < 1:
                raise SystemExit(
                    f"error: --{name.replace('_', '-')} {getattr(self, name)}: must be >= 1."
                )


def checkpoints(runs: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(method, model.pt) of each `method=run_folder` argument, checked before anything runs."""
    pairs = []
    for item in runs:
        method, _, where = item.partition("=")
        path = Path(where) / "model.pt" if Path(where).is_dir() else Path(where)
        if method not in MODELS or not where:
            raise SystemExit(
                f"error: {item!r}: expected method=run_folder with method one of "
                f"{', '.join(MODELS)}."
            )
        if not path.is_file():
            raise SystemExit(
                f"error: {where}: no model.pt there; pass a run folder of {method}.py or "
                "its model.pt."
            )
        pairs.append((method, path))
    if not pairs:
        raise SystemExit(
            "error: no checkpoint given; pass method=run_folder pairs, e.g. dt=runs/RUN."
        )
    return pairs


def evaluate_at(mod, model, ckpt: dict, checkpoint: Path, k: int, args: Args) -> dict:
    """One evaluation with --eval-context k, conditioned on the checkpoint's target return."""
    dev, info = torch.device(args.device), ckpt["dataset"]
    target = (
        ckpt["args"].get("target_return")
        or mod.TARGET_RETURNS[info["env_id"].split("-")[0].lower()]
    )
    stats = (ckpt["state_mean"].cpu().numpy(), ckpt["state_std"].cpu().numpy())
    episodes, seed = args.eval_episodes, args.seed
    run = mod.Args(checkpoint=str(checkpoint), updates=0, eval_episodes=episodes, seed=seed,
                   eval_context=k)  # fmt: skip
    res = mod.evaluate(
        model, info, stats, run, target, dev, torch.autocast(dev.type, enabled=False)
    )
    row = {"context": k, **{key: res[key] for key in ("normalized", "returns", "lengths")}}
    return row | {
        "normalized_mean": res["normalized_mean"],
        "normalized_std": res["normalized_std"],
    }


def sweep(method: str, checkpoint: Path, args: Args) -> dict:
    """The checkpoint's evaluation at every K' <= K, with its own method file's evaluate(); and its
    random-init control's at the shortest K' and at K."""
    mod = importlib.import_module(method)
    dev = torch.device(args.device)
    ckpt = mod.load_checkpoint(str(checkpoint), dev)
    cls = getattr(mod, MODELS[method])
    model = cls(**ckpt["arch"]).to(dev)
    model.load_state_dict(ckpt["model"])
    K, rows = model.K, []
    for k in sorted({c for c in args.contexts if c <= K} | {K}):
        rows.append(evaluate_at(mod, model, ckpt, checkpoint, k, args))
        score = f"{rows[-1]['normalized_mean']:.1f} ± {rows[-1]['normalized_std']:.1f}"
        print(f"{method} ({checkpoint.parent.name}), K' = {k} of K = {K}: {score}")
    ends, control_rows = sorted({rows[0]["context"], K}), []
    for i in range(args.controls):
        control = random_init(cls, seed=CONTROL_SEED + i, **ckpt["arch"]).to(dev)
        control_rows.append([evaluate_at(mod, control, ckpt, checkpoint, k, args) for k in ends])
    skipped = sorted(c for c in args.contexts if c > K)
    out = dict(method=method, checkpoint=str(checkpoint), K=K, dataset=ckpt["dataset"]["name"])
    out |= dict(source=ckpt["dataset"]["source"], trained_updates=ckpt.get("trained_updates"))
    out |= dict(skipped=skipped, rows=rows, control_rows=control_rows)
    return out | {"verdict": shorter_hurts(rows, control_rows, K)}


def drop(rows: list[dict]) -> tuple[float, float]:
    """The mean per-episode score at the longest context minus that at the shortest (episodes paired
    by env seed), and its standard error."""
    d = np.asarray(rows[-1]["normalized"]) - np.asarray(rows[0]["normalized"])
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")


def shorter_hurts(rows: list[dict], control_rows: list[list[dict]], K: int) -> dict:
    """Whether a shorter evaluation context hurts: the drop from K to the shortest K' (rows sorted
    by context, the last K) against the random-init controls' mean drop between the same two
    contexts, or MIN_DROP where that is larger. Holds when ours is beyond it by two standard
    deviations of ours minus a random-init model's (over episodes, and over control seeds: a
    near-deterministic policy's episodes barely differ, while another random init drops
    differently); does not hold when it falls short of it by more than that margin; else not
    decidable at this budget.
    """
    if rows[0]["context"] == K:
        return dict(
            verdict=UNDECIDED, sentence=f"only K' = K = {K} was evaluated: nothing to compare."
        )
    d, se = drop(rows)
    drops = [drop(c) for c in control_rows]
    dc = float(np.mean([x for x, _ in drops]))
    var_c = np.var([x for x, _ in drops], ddof=1) if len(drops) > 1 else drops[0][1] ** 2
    spread = 2 * np.sqrt(se**2 + var_c)
    judged = beyond_control(d, dc, neutral=MIN_DROP, factor=1.0, spread=spread)
    best = max(rows, key=lambda r: r["normalized_mean"])
    short, full = (f"{r['normalized_mean']:.1f}" for r in (rows[0], rows[-1]))
    sentence = (
        f"K' = {rows[0]['context']} scores {short} against {full} at K = {K}: a drop of {d:+.1f} "
        f"(random-init controls: {dc:+.1f}; margin, two standard deviations: {spread:.1f}, over "
        f"{len(rows[0]['normalized'])} paired episodes and {len(drops)} controls); the best is "
        f"K' = {best['context']} ({best['normalized_mean']:.1f}). "
        f"A shorter context hurts: {judged}."
    )
    return dict(verdict=judged, drop=d, control_drop=dc, margin=float(spread), sentence=sentence)


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in results:
        k = [row["context"] for row in r["rows"]]
        m, s = (
            [row["normalized_mean"] for row in r["rows"]],
            [row["normalized_std"] for row in r["rows"]],
        )
        label = f"{r['method']} ({Path(r['checkpoint']).parent.name}), K = {r['K']}"
        ax.errorbar(k, m, yerr=s, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("evaluation context K' (steps)")
    ax.set_ylabel(f"normalized score ({common.SOURCE_LABEL[results[0]['source']]} data)")
    ax.set_title("score against the evaluation context (bars: spread over episodes)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args) -> dict:
    pairs = checkpoints(args.runs)
    out = common.output_folder(args.out, "eval_context", args.force)
    results = [sweep(m, p, args) for m, p in pairs]
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items()}
    (out / "eval_context.json").write_text(
        json.dumps(dict(config=config, results=results), indent=1)
    )
    plot(results, out / "eval_context.png")
    print("\nmethod | run | K' | normalized score | mean episode length")
    for r in results:
        for row in r["rows"]:
            score = f"{row['normalized_mean']:.1f} ± {row['normalized_std']:.1f}"
            name = Path(r["checkpoint"]).parent.name
            length = np.mean(row["lengths"])
            print(f"{r['method']} | {name} | {row['context']} | {score} | {length:.0f}")
    for r in results:
        left_out = (
            f" (K' = {', '.join(map(str, r['skipped']))} > K left out)" if r["skipped"] else ""
        )
        name = Path(r["checkpoint"]).parent.name
        print(f"{r['method']} ({name}): {r['verdict']['sentence']}{left_out}")
    print(f"wrote {out / 'eval_context.png'} and eval_context.json")
    return dict(results=results)


if __name__ == "__main__":
    main(tyro.cli(Args))
