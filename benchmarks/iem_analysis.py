"""IEM (LEAP) on BabyAI: success of iterative energy minimization against its BC baseline (the same network, one
forward, no refinement) over levels and seeds, energy against refinement iteration, and attention maps per layer
averaged over heads, with the blog's §7.b claims about them measured ("blog claim | ours | verdict").

    python benchmarks/iem_analysis.py            # the committed results' setup: 2 levels x 2 seeds, ~30 min
    python benchmarks/iem_analysis.py --quick    # seconds: the whole pipeline on a tiny budget
    python benchmarks/iem_analysis.py --out benchmarks/results/iem --force  # regenerate the committed ones

Writes summary.json (with every layer's head-averaged map as arrays, for the DT/TT/IEM side-by-side
figure), energy.png, attention.png and success.png to --out (default: a new runs/iem_analysis__{time};
a folder that holds files only with --force); run folders go to --runs-dir.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import iem  # noqa: E402

# The blog's words (§7.b, "LEAP Attention Evolution" and the IEM caption), each with the rule that judges it.
CLAIMS = {
    "layer0_band": (
        "layer 0: a strong vertical band, all queries attend to one key position (~0.7 weight)",
        "holds if one key takes >= 0.5 of the mean attention row (of all queries, or of the plan tokens alone), "
        "partly if >= 0.3",
    ),
    "middle_dual": (
        "middle layers: dual vertical bands",
        "holds if the top two keys take >= 0.4 together, the second >= half the first and the third < "
        "half the second; partly if the top two take >= 0.4 only",
    ),
    "deep_grid": (
        "deep layers: a distributed grid, no single dominant column",
        "holds if no key takes >= 0.3 and the effective number of keys exp(entropy) >= T/2; partly if one",
    ),
    "past_future": (
        "IEM attends broadly across past AND future",
        "the predicting (masked) plan token's mass on earlier and on later plan tokens, each against its "
        "uniform share: holds if both >= half of it in every layer, partly if in some layer",
    ),
}


@dataclass
class Args:
    levels: tuple[str, ...] = ("GoToLocalS7N5", "GoToObjMazeS4R2")
    """BabyAI levels (iem.py --env names); the paper's levels keep its horizon and iterations"""
    seeds: tuple[int, ...] = (0, 1)
    """training seeds per level"""
    preset: Literal["paper", "cpu"] = "cpu"
    """iem.py budget preset"""
    updates: int | None = None
    """gradient updates per run (default: the preset's)"""
    collect: int | None = None
    """bot demonstrations per level (default: the preset's)"""
    eval_episodes: int = 100
    """evaluation episodes per run (the same ones for IEM and BC)"""
    attention_states: int = 64
    """start states whose refined plans are fed back (single-masked, as in the energy) to record attention"""
    from_summary: str | None = None
    """re-judge the claims and redraw the figures from this summary.json (no training); writes them to --out"""
    quick: bool = False
    """a tiny budget (a smoke test of the pipeline, numbers meaningless): 1 seed, few updates, demos, episodes"""
    runs_dir: str = "runs/iem_analysis"
    """parent folder of the iem.py run folders"""
    data_dir: str = "~/.cache/seqrl/babyai"
    """iem.py's demonstration cache"""
    out: Optional[str] = None
    """folder of summary.json and the figures (default: a new runs/iem_analysis__{unix time}); the
    committed results are regenerated with --out benchmarks/results/iem --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    threads: int = 1
    """torch CPU threads per run (the 2 cores of the reference machine are shared)"""


def run_args(a: Args, level: str, seed: int, **kw) -> iem.Args:
    tiny = {"updates": 4, "collect": 10, "eval_episodes": 2, "n_embd": 16, "n_head": 2, "horizon": 3, "iterations": 2}
    base = {
        "env": level,
        "seed": seed,
        "preset": a.preset,
        "updates": a.updates,
        "collect": a.collect,
        "eval_episodes": a.eval_episodes,
        "runs_dir": a.runs_dir,
        "data_dir": a.data_dir,
        "threads": a.threads,
    }
    return iem.Args(**{**base, **(tiny if a.quick else {}), **kw})


@torch.no_grad()
def attention(model, args: iem.Args, arch: dict, n: int, seed: int) -> dict:
    """Head-averaged attention of every layer on the single-masked copies of refined plans (the inputs whose
    NLLs make the energy), from `n` evaluation start states; and the masked query's mass on earlier/later actions."""
    H, M = arch["horizon"], arch["mission_len"]
    obs = [iem.reset(iem.make_env(args.env), iem.EVAL_SEED_BASE + 1000 * seed + i) for i in range(n)]
    images = torch.as_tensor(np.stack([o["image"] for o in obs])).long()
    words = torch.tensor([iem.tokenize(o["mission"], M) for o in obs]).view(n, M)
    model.eval()
    plan, _ = iem.plan_actions(model, images, words, args, H, torch.Generator().manual_seed(seed))
    copies, _, _ = iem.single_masks(plan)
    _, attns = model(images, words, copies, copies=H, return_attn=True)
    real = torch.cat([torch.ones(n, 1, dtype=torch.bool), words != 0, torch.ones(n, H, dtype=torch.bool)], 1)
    real = real.repeat_interleave(H, 0).float()  # (n H, T): padded words are no queries
    maps, past, future = [], [], []
    for att in attns:
        a = att.float().mean(1)  # (n H, T, T), averaged over heads
        maps.append(((a * real[:, :, None]).sum(0) / real.sum(0)[:, None]).tolist())
        q = a.view(n, H, a.shape[-2], -1)[:, torch.arange(H), 1 + M + torch.arange(H)]  # (n, H, T): copy j, query a_j
        past.append([q[:, j, 1 + M : 1 + M + j].sum(-1).mean().item() for j in range(H)])
        future.append([q[:, j, 2 + M + j :].sum(-1).mean().item() for j in range(H)])
    labels = ["obs"] + [f"w{i + 1}" for i in range(M)] + [f"a{j + 1}" for j in range(H)]
    n_real = float(real.sum(1).mean())
    return {
        "labels": labels,
        "layers": maps,
        "masked_query_past_mass": past,
        "masked_query_future_mass": future,
        "real_tokens": n_real,
        "states": n,
    }


def judge(att: dict, H: int) -> dict:
    """The blog's four claims on head-averaged maps (L, T, T): our numbers and a verdict, by the rules in CLAIMS."""
    maps, labels = np.array(att["layers"]), att["labels"]
    L, T = maps.shape[0], att["real_tokens"]
    cols = maps.mean(1)  # (L, T): the mean attention row (each sums to 1); a vertical band = a large entry
    out = {}
    top, plan_row = cols[0].argmax(), maps[0, -H:].mean(0)  # plan_row: the mean row of the action queries
    top_plan = plan_row.argmax()
    v = max(cols[0, top], plan_row[top_plan])
    out["layer0_band"] = (
        f"layer 0: key {labels[top]} takes {cols[0, top]:.2f} of the mean row (rightmost key: {cols[0, -1]:.2f}); "
        f"of the plan tokens' mean row, key {labels[top_plan]} takes {plan_row[top_plan]:.2f}",
        "holds" if v >= 0.5 else "partly" if v >= 0.3 else "does not hold",
    )
    mid = [layer for layer in range(1, L - 1)] or [min(1, L - 1)]
    c = np.sort(cols[mid].mean(0))[::-1]
    two = c[0] + c[1] >= 0.4
    dual = two and c[1] >= 0.5 * c[0] and (len(c) < 3 or c[2] < 0.5 * c[1])
    out["middle_dual"] = (
        f"layers {mid}: top keys {c[0]:.2f}, {c[1]:.2f}, {c[2] if len(c) > 2 else 0:.2f}",
        "holds" if dual else "partly" if two else "does not hold",
    )
    deep = cols[L - 1]
    p = deep[deep > 0] / deep.sum()
    eff = math.exp(-(p * np.log(p)).sum())
    flat, broad = deep.max() < 0.3, eff >= T / 2
    out["deep_grid"] = (
        f"layer {L - 1}: largest key {deep.max():.2f}, effective keys {eff:.1f} of {T:.0f}",
        "holds" if flat and broad else "partly" if flat or broad else "does not hold",
    )
    inner = range(1, H - 1) if H > 2 else range(H)
    ratios = []
    for past, fut in zip(att["masked_query_past_mass"], att["masked_query_future_mass"]):
        uni_p, uni_f = np.mean([j / T for j in inner]), np.mean([(H - 1 - j) / T for j in inner])
        ratios.append(
            (np.mean([past[j] for j in inner]) / max(uni_p, 1e-9), np.mean([fut[j] for j in inner]) / max(uni_f, 1e-9))
        )
    ok = [min(r) >= 0.5 for r in ratios]
    text = ", ".join(f"L{i}: past {rp:.2f}x, future {rf:.2f}x uniform" for i, (rp, rf) in enumerate(ratios))
    out["past_future"] = (text, "holds" if all(ok) else "partly" if any(ok) else "does not hold")
    return {k: {"blog": CLAIMS[k][0], "rule": CLAIMS[k][1], "ours": o, "verdict": v} for k, (o, v) in out.items()}


def fit(text: str, fig) -> str:
    """A title wrapped to the figure's width (about 12 characters per inch at the default size): a
    one-level --quick figure is narrower than its title."""
    return textwrap.fill(text, max(20, int(12 * fig.get_figwidth())))


def figures(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(summary["levels"])
    fig, ax = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 3.4), squeeze=False)
    for i, lv in enumerate(levels):
        for r in summary["levels"][lv]["runs"]:
            ax[0, i].plot(r["energy_per_iteration"], marker=".", label=f"seed {r['seed']}")
        ax[0, i].set(title=lv, xlabel="refinement iteration", ylabel="plan energy (sum of NLLs, nats)")
        ax[0, i].legend()
    fig.suptitle(fit("IEM: energy of the plan against iteration (mean over planning calls)", fig))
    fig.tight_layout()
    fig.savefig(out / "energy.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    L = len(summary["levels"][levels[0]]["attention"]["layers"])
    fig, ax = plt.subplots(len(levels), L, figsize=(3.6 * L, 3.4 * len(levels)), squeeze=False)
    for i, lv in enumerate(levels):
        att = summary["levels"][lv]["attention"]
        for k, m in enumerate(att["layers"]):
            im = ax[i, k].imshow(m, cmap="viridis", vmin=0)
            ax[i, k].set_xticks(range(len(att["labels"])), att["labels"], rotation=90, fontsize=6)
            ax[i, k].set_yticks(range(len(att["labels"])), att["labels"], fontsize=6)
            ax[i, k].set_title(f"{lv}: layer {k}", fontsize=9)
            fig.colorbar(im, ax=ax[i, k], fraction=0.046)
    title = "IEM attention per layer, averaged over heads (rows: queries, columns: keys)"
    fig.suptitle(fit(title, fig))
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    keys = [
        ("bc", "BC, plan of H"),
        ("iem", "IEM, plan of H"),
        ("bc_replan1", "BC, replan every step"),
        ("iem_replan1", "IEM, replan every step"),
    ]
    fig, ax = plt.subplots(figsize=(2.2 + 2.6 * len(levels), 3.4))
    for k, (key, name) in enumerate(keys):
        x = np.arange(len(levels)) + (k - 1.5) * 0.2
        vals = [[r[f"{key}_success"] for r in summary["levels"][lv]["runs"]] for lv in levels]
        ax.bar(x, [np.mean(v) for v in vals], 0.2, label=name)
        for xi, v in zip(x, vals):
            ax.plot([xi] * len(v), v, "k.", ms=4)
    ax.set_xticks(range(len(levels)), levels)
    ax.set(ylabel="success rate", ylim=(0, 1))
    ax.set_title(fit("IEM against BC (bars: mean over seeds, dots: seeds)", fig), fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(out / "success.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(a: Args) -> dict:
    t0 = time.time()
    out = common.output_folder(a.out, "iem_analysis" + ("_quick" if a.quick else ""), a.force)
    if a.from_summary is not None:
        if not Path(a.from_summary).is_file():
            raise SystemExit(
                f"error: --from-summary {a.from_summary}: no such file; pass a summary.json of this script."
            )
        summary = json.loads(Path(a.from_summary).read_text())
        for d in summary["levels"].values():
            d["claims"] = judge(d["attention"], d["runs"][0]["arch"]["horizon"])
        return finish(summary, out)
    seeds = a.seeds[:1] if a.quick else a.seeds
    summary = {"config": asdict(a), "levels": {}}
    for level in levels_of(a):
        runs, maps = [], []
        for seed in seeds:
            res = iem.train(run_args(a, level, seed))
            ckpt = str(Path(res["run_dir"]) / "model.pt")
            closed = iem.train(
                run_args(a, level, seed, checkpoint=ckpt, updates=0, replan_every=1, exp_name="iem_replan1")
            )
            model = iem.IEM(**res["arch"])
            model.load_state_dict(iem.load_checkpoint(ckpt, "cpu")["model"])
            maps.append(attention(model, run_args(a, level, seed), res["arch"], a.attention_states, seed))
            runs.append(
                {
                    "seed": seed,
                    "run_dir": res["run_dir"],
                    "iem_success": res["iem"]["success_rate"],
                    "bc_success": res["bc"]["success_rate"],
                    "iem_replan1_success": closed["iem"]["success_rate"],
                    "bc_replan1_success": closed["bc"]["success_rate"],
                    "iem_return": res["iem"]["return_mean"],
                    "bc_return": res["bc"]["return_mean"],
                    "energy_per_iteration": res["iem"]["energy_per_iteration"],
                    "energy_drop": res["energy_drop"],
                    "train_updates_per_s": res["train_updates_per_s"],
                    "iem_planning_s_per_step": res["iem"]["planning_s_per_step"],
                    "bc_planning_s_per_step": res["bc"]["planning_s_per_step"],
                    "iem_replan1_planning_s_per_step": closed["iem"]["planning_s_per_step"],
                    "updates": res["updates"],
                    "demos": res["demos"],
                    "arch": res["arch"],
                }
            )
        att = {
            **maps[0],
            "layers": np.mean([m["layers"] for m in maps], 0).tolist(),
            "per_seed_layers": [m["layers"] for m in maps],
        }
        for k in ("masked_query_past_mass", "masked_query_future_mass"):
            att[k] = np.mean([m[k] for m in maps], 0).tolist()
        mean = {
            k: float(np.mean([r[k] for r in runs]))
            for k in runs[0]
            if k.endswith(("success", "_per_s", "drop", "per_step"))
        }
        summary["levels"][level] = {
            "runs": runs,
            "mean": mean,
            "attention": att,
            "claims": judge(att, res["arch"]["horizon"]),
        }
    summary["wall_time_s"] = time.time() - t0
    return finish(summary, out)


def finish(summary: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    figures(summary, out)
    report(summary)
    print(f"\nwrote summary.json, energy.png, attention.png and success.png to {out}")
    return summary


def levels_of(a: Args) -> tuple[str, ...]:
    return a.levels[:1] if a.quick else a.levels


def report(summary: dict) -> None:
    print(
        "\nlevel | seeds | IEM success | BC success | IEM / BC replanning every step | energy drop | updates/s | "
        "IEM ms/step | BC ms/step"
    )
    for lv, d in summary["levels"].items():
        m, s = d["mean"], [r["seed"] for r in d["runs"]]
        print(
            f"{lv} | {s} | {m['iem_success']:.2f} | {m['bc_success']:.2f} | {m['iem_replan1_success']:.2f} / "
            f"{m['bc_replan1_success']:.2f} | {m['energy_drop']:.2f} | {m['train_updates_per_s']:.2f} | "
            f"{m['iem_planning_s_per_step'] * 1e3:.2f} | {m['bc_planning_s_per_step'] * 1e3:.2f}"
        )
    print("\nblog claim | ours | verdict")
    for lv, d in summary["levels"].items():
        for c in d["claims"].values():
            print(f"{c['blog']} | {lv}: {c['ours']} | {c['verdict']}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
