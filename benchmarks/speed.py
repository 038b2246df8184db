"""Speed of every method file on this machine: training updates/s and evaluation env-steps/s, at the
default and the thesis-size configs, and the vectorized evaluation against one episode at a time.

    python benchmarks/speed.py --data-dir ../shared/d4rl-replica            # CPU: a few minutes
    python benchmarks/speed.py --data-dir ../shared/d4rl-replica --updates 300 --device cuda

Each measurement runs the method file as a user would (a subprocess) and reads the updates/s and
env-steps/s it records in results.json. Evaluation is timed on halfcheetah by default: its episodes never
terminate early, so every episode is 1000 steps with a full context (hopper's early falls would flatter
the numbers). One-episode-at-a-time is the same trained checkpoint evaluated with --eval-episodes 1.
Writes benchmarks/results/speed__{device}__{time}.json (never overwrites) and prints a table.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import dataset_paths  # noqa: E402

THESIS_SIZE = ["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--batch-size", "256"]  # Table 1.1
CONFIGS = {  # (method, config name) -> script and flags; mo_dt/trdt/rgdt defaults ARE the thesis's
    ("dt", "default (DT paper)"): ("dt.py", []),
    ("dt", "thesis size (Table 1.1)"): ("dt.py", THESIS_SIZE),
    ("mo_dt", "default = Table 1.1"): ("mo_dt.py", []),
    ("trdt", "default = Table 1.1"): ("trdt.py", []),
    ("rgdt", "default = §2.4"): ("rgdt.py", []),
}


@dataclass
class Args:
    """Training updates/s and evaluation env-steps/s of every method file (default and thesis configs),
    vectorized evaluation against one episode at a time; JSON out, table printed. Run once per device."""

    data_dir: Optional[str] = None
    """folder with the dataset's hdf5 (replica or official names); default: official D4RL resolution"""
    dataset: str = "halfcheetah-medium-replay"
    """dataset to train and evaluate on"""
    updates: int = 30
    """training updates per measurement (the first few include warm-up; use more on a GPU)"""
    eval_episodes: int = 10
    """episodes evaluated at once for the vectorized figure"""
    methods: tuple[str, ...] = ("dt", "mo_dt", "trdt", "rgdt")
    """method files to measure"""
    device: str = "auto"
    """auto, cpu or cuda"""
    single: bool = True
    """also evaluate one episode at a time (same checkpoint) for the comparison"""
    out_dir: str = str(ROOT / "benchmarks" / "results")
    """where the JSON goes"""


def run(script: str, flags: list[str], runs_dir: str) -> dict:
    cmd = [sys.executable, script, *flags, "--runs-dir", runs_dir]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    newest = max(Path(runs_dir).iterdir(), key=lambda d: d.stat().st_mtime)
    return json.loads((newest / "results.json").read_text())


def main(args: Args) -> dict:
    from tqdm import tqdm

    known = sorted({m for m, _ in CONFIGS})
    if not args.methods or any(m not in known for m in args.methods):
        raise SystemExit(f"error: --methods {' '.join(args.methods)}: choose from {', '.join(known)}.")
    if args.updates < 1 or args.eval_episodes < 1:
        raise SystemExit("error: --updates and --eval-episodes must be at least 1.")
    paths = dataset_paths(args.dataset, args.data_dir)
    data = ["--env", args.dataset, "--device", args.device] + (["--dataset-path", *paths] if paths else [])
    rows, t0 = [], time.time()
    todo = [(k, v) for k, v in CONFIGS.items() if k[0] in args.methods and (ROOT / v[0]).exists()]
    with tempfile.TemporaryDirectory() as tmp:
        for (method, config), (script, flags) in tqdm(todo, desc="speed"):
            budget = ["--updates", str(args.updates), "--warmup-steps", "10", "--eval-every", "0"]
            if method == "rgdt":
                budget += ["--inv-updates", str(args.updates)]
            res = run(script, data + flags + budget + ["--eval-episodes", str(args.eval_episodes)], tmp)
            row = dict(method=method, config=config, flags=flags, device=res["device"], updates=args.updates,
                       train_updates_per_s=res["train_updates_per_s"], eval_episodes=args.eval_episodes,
                       eval_env_steps_per_s=res["eval_env_steps_per_s"], eval_mean_length=sum(res["lengths"]) / len(res["lengths"]))
            if "inv_train_updates_per_s" in res:  # rgdt's second model, the inverse dynamics
                row["inv_train_updates_per_s"] = res["inv_train_updates_per_s"]
            if args.single:
                ckpt = Path(res["run_dir"]) / "model.pt"
                eval_only = ["--checkpoint", str(ckpt), "--updates", "0", "--eval-episodes", "1"]
                one = run(script, data + eval_only + (["--inv-updates", "0"] if method == "rgdt" else []), tmp)
                row["eval_single_env_steps_per_s"] = one["eval_env_steps_per_s"]
                row["vectorized_speedup"] = row["eval_env_steps_per_s"] / one["eval_env_steps_per_s"]
            rows.append(row)
            tqdm.write(json.dumps(row))
    import torch

    device = rows[0]["device"] if rows else args.device
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        commit = None
    report = dict(config=vars(args), rows=rows, device=device, gpu=gpu, cpu=platform.processor() or platform.machine(),
                  cpu_threads=torch.get_num_threads(), torch=torch.__version__, git_commit=commit, wall_time_s=time.time() - t0,
                  dataset_source="replica" if paths and "replica" in paths[0] else ("official D4RL" if not paths else "local file"))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed__{device.replace(':', '')}__{int(time.time())}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\n| method | config | updates/s | eval env-steps/s ({args.eval_episodes} at once) | one at a time | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['config']} | {r['train_updates_per_s']:.2f} | {r['eval_env_steps_per_s']:.0f} | "
              f"{r.get('eval_single_env_steps_per_s', float('nan')):.0f} | {r.get('vectorized_speedup', float('nan')):.1f}x |")
    print(f"device {device}{' (' + gpu + ')' if gpu else ''}; wrote {path}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
