"""Attention of DT, MO-DT and TRDT side by side (thesis §1.5.2, Fig. 1.1-1.3), from trained runs.

    python benchmarks/attention.py dt=runs/RUN_A mo_dt=runs/RUN_B trdt=runs/RUN_C --out attention_cmp

Each argument is `method=run_folder`. A run folder that already has attention.json (trained with
--attention) is read as it is; otherwise its model.pt is evaluated again with `--attention` (same dataset,
same flags as in its config.json) into `{out}/runs/`. Writes `{out}/attention_comparison.png` (rows:
models; columns: blocks, mean attention per modality with the spread across heads; last column: head
entropy per block) and `{out}/attention_comparison.json`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"dt": "dt.py", "mo_dt": "mo_dt.py", "trdt": "trdt.py"}


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """`method=run_folder` pairs, method one of dt, mo_dt, trdt"""
    out: str = "attention_comparison"
    """output folder (created; existing files in it are not overwritten)"""
    eval_episodes: int = 5
    """episodes per rollout when a run has to be analysed again"""


def analysis_for(method: str, run: Path, out: Path, episodes: int) -> dict:
    if (run / "attention.json").exists():
        return json.loads((run / "attention.json").read_text())
    if not (run / "model.pt").exists():
        raise SystemExit(f"error: {run} has neither attention.json nor model.pt; pass a run folder of {SCRIPTS[method]}.")
    cfg = json.loads((run / "config.json").read_text())["args"]
    cmd = [sys.executable, SCRIPTS[method], "--env", cfg["env"], "--checkpoint", str(run / "model.pt"), "--updates", "0",
           "--attention", "--eval-episodes", str(episodes), "--runs-dir", str(out / "runs"), "--exp-name", f"{method}_attention"]
    if cfg.get("dataset_path"):
        cmd += ["--dataset-path", *cfg["dataset_path"]]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    newest = max((out / "runs").glob(f"*__{method}_attention__*"), key=lambda d: d.stat().st_mtime)
    return json.loads((newest / "attention.json").read_text())


def main(args: Args) -> dict:
    pairs = []
    for item in args.runs:
        method, _, folder = item.partition("=")
        if method not in SCRIPTS or not folder:
            raise SystemExit(f"error: {item!r}: expected method=run_folder with method one of {', '.join(SCRIPTS)}.")
        if not Path(folder).is_dir():
            raise SystemExit(f"error: {folder}: no such run folder.")
        pairs.append((method, Path(folder)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("attention_comparison.png", "attention_comparison.json"):
        if (out / name).exists():
            raise SystemExit(f"error: {out / name} exists; choose another --out (nothing is overwritten).")
    results = {f"{m} ({p.name})": analysis_for(m, p, out, args.eval_episodes) for m, p in pairs}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = max(len(a["modality_mass_mean"]) for a in results.values())
    fig, ax = plt.subplots(len(results), L + 1, figsize=(3.2 * (L + 1), 2.8 * len(results)), squeeze=False)
    for r, (name, a) in enumerate(results.items()):
        mean, std, ent = np.array(a["modality_mass_mean"]), np.array(a["modality_mass_std_across_heads"]), np.array(a["entropy_per_head"])
        for b in range(L):
            if b < len(mean):
                ax[r, b].bar(a["modalities"], mean[b], yerr=std[b], capsize=3)
                ax[r, b].set_ylim(0, 1)
            ax[r, b].set_title(f"{name}: block {b + 1}" if b == 0 else f"block {b + 1}", fontsize=8)
        for h in range(ent.shape[1]):
            ax[r, L].plot(range(1, len(ent) + 1), ent[:, h], marker="o", label=f"head {h + 1}")
        ax[r, L].set_title("head entropy (nats) per block", fontsize=8)
        ax[r, L].set_xlabel("block")
    ax[0, L].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "attention_comparison.png", dpi=110)
    plt.close(fig)
    summary = {name: dict(modalities=a["modalities"], modality_mass_mean=a["modality_mass_mean"],
                          modality_mass_std_across_heads=a["modality_mass_std_across_heads"],
                          mean_head_entropy_per_block=np.array(a["entropy_per_head"]).mean(1).tolist()) for name, a in results.items()}
    (out / "attention_comparison.json").write_text(json.dumps(summary, indent=1))
    for name, s in summary.items():
        print(name)
        for b, (m, e) in enumerate(zip(s["modality_mass_mean"], s["mean_head_entropy_per_block"])):
            print(f"  block {b + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in zip(s["modalities"], m)) + f"; mean head entropy {e:.2f}")
    print(f"wrote {out / 'attention_comparison.png'}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
