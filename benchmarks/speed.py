"""Speed of every method file on this machine: training updates/s and evaluation env-steps/s, at the
default and the thesis-size configs, in each precision the device offers, and the vectorized evaluation
against one episode at a time.

    python benchmarks/speed.py --data-dir ../shared/d4rl-replica            # CPU: a few minutes
    python benchmarks/speed.py --data-dir ../shared/d4rl-replica --updates 300 --device cuda

Precisions: on a CPU fp32, and bf16 autocast when the CPU has it natively (AVX512-BF16 or AMX; elsewhere the
method files stay in fp32, so there is nothing to compare); on CUDA bf16 with and without --compile.

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
DT_SIZE = ["--n-layer", "3", "--n-head", "1", "--n-embd", "128", "--batch-size", "64"]  # the DT paper's
CONFIGS = {  # (method, config name) -> script and flags; mo_dt/trdt/rgdt defaults ARE the thesis's
    ("dt", "default (DT paper)"): ("dt.py", []),
    ("dt", "thesis size (Table 1.1)"): ("dt.py", THESIS_SIZE),
    ("mo_dt", "DT size"): ("mo_dt.py", DT_SIZE),
    ("mo_dt", "default = Table 1.1"): ("mo_dt.py", []),
    ("trdt", "DT size"): ("trdt.py", DT_SIZE),
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
    configs: tuple[str, ...] = ()
    """only the configs whose name starts with one of these (e.g. `default`); default: all"""
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


def cpu_model() -> str:
    """The processor's marketing name (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def precisions(cuda: bool, bf16_native: bool) -> dict:
    """Name -> flags of every precision worth measuring on this device."""
    if cuda:
        return {"bf16": ["--bf16"], "bf16 + compile": ["--bf16", "--compile"]}
    return {"fp32": ["--no-bf16"], **({"bf16": ["--bf16"]} if bf16_native else {})}


def main(args: Args) -> dict:
    import torch
    from tqdm import tqdm

    import common

    known = sorted({m for m, _ in CONFIGS})
    if not args.methods or any(m not in known for m in args.methods):
        raise SystemExit(f"error: --methods {' '.join(args.methods)}: choose from {', '.join(known)}.")
    if args.updates < 1 or args.eval_episodes < 1:
        raise SystemExit("error: --updates and --eval-episodes must be at least 1.")
    paths = dataset_paths(args.dataset, args.data_dir)
    data = ["--env", args.dataset, "--device", args.device] + (["--dataset-path", *paths] if paths else [])
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    variants = precisions(cuda, native)
    rows, t0 = [], time.time()
    todo = [(k, v) for k, v in CONFIGS.items() if k[0] in args.methods and (ROOT / v[0]).exists()]
    todo = [(k, v) for k, v in todo if not args.configs or k[1].startswith(tuple(args.configs))]
    with tempfile.TemporaryDirectory() as tmp:
        for (method, config), (script, flags) in tqdm(todo, desc="speed"):
            budget = ["--updates", str(args.updates), "--warmup-steps", "10", "--eval-every", "0"]
            if method == "rgdt":
                budget += ["--inv-updates", str(args.updates)]
            for i, (precision, pflags) in enumerate(variants.items()):
                res = run(script, data + flags + budget + pflags + ["--eval-episodes", str(args.eval_episodes)], tmp)
                row = dict(method=method, config=config, precision=precision, flags=flags + pflags,
                           device=res["device"], bf16_used=res.get("bf16"), updates=args.updates,
                           train_updates_per_s=res["train_updates_per_s"], eval_episodes=args.eval_episodes,
                           eval_env_steps_per_s=res["eval_env_steps_per_s"],
                           eval_mean_length=sum(res["lengths"]) / len(res["lengths"]))  # fmt: skip
                if "inv_train_updates_per_s" in res:  # rgdt's second model, the inverse dynamics
                    row["inv_train_updates_per_s"] = res["inv_train_updates_per_s"]
                if args.single and i == 0:  # the vectorized evaluation's gain does not depend on the precision
                    ckpt = Path(res["run_dir"]) / "model.pt"
                    eval_only = ["--checkpoint", str(ckpt), "--updates", "0", "--eval-episodes", "1", *pflags]
                    one = run(
                        script,
                        ["--device", args.device] + eval_only + (["--inv-updates", "0"] if method == "rgdt" else []),
                        tmp,
                    )
                    row["eval_single_env_steps_per_s"] = one["eval_env_steps_per_s"]
                    row["vectorized_speedup"] = row["eval_env_steps_per_s"] / one["eval_env_steps_per_s"]
                rows.append(row)
                tqdm.write(json.dumps(row))
    base = {
        (r["method"], r["config"]): r["train_updates_per_s"] for r in rows if r["precision"] == next(iter(variants))
    }
    for r in rows:  # the gain over the first precision of the same config (fp32 on a CPU)
        r["speedup_vs_" + next(iter(variants)).replace(" ", "")] = (
            r["train_updates_per_s"] / base[(r["method"], r["config"])]
        )
    device = rows[0]["device"] if rows else args.device
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        commit = git.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    # the loader's own verdict on the data (replica, official D4RL, local file), as every run recorded it
    source = common.SOURCE_LABEL[res["dataset"]["source"]] if rows else None
    report = dict(config=vars(args), rows=rows, device=device, gpu=gpu, cpu=cpu_model(), cpu_bf16_native=native,
                  cpu_threads=torch.get_num_threads(), torch=torch.__version__, git_commit=commit,
                  wall_time_s=time.time() - t0, dataset_source=source, precisions=list(variants))  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed__{device.replace(':', '')}__{int(time.time())}.json"
    path.write_text(json.dumps(report, indent=1))
    print(
        f"\n| method | config | precision | updates/s | vs {next(iter(variants))} | eval env-steps/s "
        f"({args.eval_episodes} at once) | one at a time | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        single, gain = r.get("eval_single_env_steps_per_s"), r.get("vectorized_speedup")
        ratio = r["speedup_vs_" + next(iter(variants)).replace(" ", "")]
        print(f"| {r['method']} | {r['config']} | {r['precision']} | {r['train_updates_per_s']:.2f} | {ratio:.2f}x | "
              f"{r['eval_env_steps_per_s']:.0f} | {'' if single is None else f'{single:.0f}'} | "
              f"{'' if gain is None else f'{gain:.1f}x'} |")  # fmt: skip
    where = f" ({gpu})" if gpu else f" ({report['cpu']}, native bf16: {native})"
    print(f"device {device}{where}; wrote {path}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
