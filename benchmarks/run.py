"""Train and evaluate methods x datasets x seeds from a preset; the raw material of Tables 1.3 and 2.1.

    python benchmarks/run.py --preset smoke  --data-dir ../shared/d4rl-replica      # CPU minutes
    python benchmarks/run.py --preset thesis --data-dir ../shared/d4rl-replica      # thesis budgets (GPU)
    python benchmarks/run.py --preset thesis                                         # official D4RL files
    python benchmarks/run.py --preset cpu --methods trdt --extra="--lr 1e-3"         # a variant: its own folders
    python benchmarks/aggregate.py benchmarks/results/thesis                         # the tables

Each job runs one method file as a subprocess (exactly the command a user would type) in its own folder
`{out}/{method}__{dataset}__s{seed}__{key}`, where `key` hashes the job's full command line AND the source
of the method file and common.py: a different config or code version is a different folder, so results
never mix. A job is finished when its folder holds results.json (written last, atomically); finished jobs
are skipped, so an interrupted run resumes where it stopped without losing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# Which file and flags make each column of Table 1.3 / 2.1.
METHODS = {
    "dt": dict(script="dt.py", flags=[], label="DT"),
    "dt-gaussian": dict(script="dt.py", flags=["--policy", "gaussian"], label="DT-Gaussian (ODT-O-style)"),
    "mo_dt": dict(script="mo_dt.py", flags=[], label="MO-DT"),
    "trdt": dict(script="trdt.py", flags=[], label="TRDT"),
    "rgdt": dict(script="rgdt.py", flags=[], label="RGDT"),
}
TABLE_1_3 = [f"{e}-{lvl}" for lvl in ("medium", "medium-replay", "medium-expert") for e in ("halfcheetah", "hopper", "walker2d")]
TABLE_2_1 = [f"{e}-{lvl}" for lvl in ("medium", "medium-expert") for e in ("halfcheetah", "hopper", "walker2d")]

# A preset: datasets, seeds and per-method flags. `thesis` = the thesis's budgets (each file's defaults are
# the thesis's settings: Table 1.1 for MO-DT/TRDT, the DT paper's for DT, §2.4 for RGDT), 10 seeds.
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "16", "--warmup-steps", "10"]
PRESETS = {
    "smoke": dict(
        datasets=["hopper-medium-replay"], seeds=[0, 1],
        common=["--eval-episodes", "3", "--eval-every", "0", "--log-every", "10"],
        flags={"dt": SMALL + ["--updates", "40"], "dt-gaussian": SMALL + ["--updates", "40"],
               "mo_dt": SMALL + ["--updates", "40"], "trdt": SMALL + ["--updates", "40"],
               "rgdt": ["--updates", "40", "--inv-updates", "40", "--batch-size", "16", "--inv-batch-size", "32", "--warmup-steps", "10"]},
    ),
    # A budget a 2-core CPU finishes in about an hour: the DT-size network (3 layers, 1 head, 128, batch
    # 64) for every Chapter 1 method, so they compare at equal size and updates; each keeps its own
    # optimizer, learning rate and loss (AdamW for DT, LAMB for MO-DT/TRDT, as in the thesis).
    "cpu": dict(
        datasets=["hopper-medium-replay"], seeds=[0, 1],
        common=["--eval-episodes", "10", "--eval-every", "500"],
        flags={m: ["--n-layer", "3", "--n-head", "1", "--n-embd", "128", "--batch-size", "64", "--updates", "2000", "--warmup-steps", "500"]
               for m in ("dt", "dt-gaussian", "mo_dt", "trdt")}
        | {"rgdt": ["--updates", "2000", "--inv-updates", "2000", "--warmup-steps", "500"]},
    ),
    "thesis": dict(
        datasets=TABLE_1_3, seeds=list(range(10)),
        common=["--eval-episodes", "10", "--eval-every", "10000"],
        flags={m: [] for m in METHODS},
        only={"rgdt": TABLE_2_1},  # Table 2.1 has medium and medium-expert rows only
    ),
}


@dataclass
class Args:
    preset: str = "smoke"
    """`smoke` (CPU minutes, tiny models), `cpu` (equal small budget for every method, CPU hours) or
    `thesis` (the thesis's configurations and 10 seeds; meant for a GPU)"""
    data_dir: Optional[str] = None
    """folder with local hdf5 files named `{dataset}.hdf5` (the replica's names) or the official
    `{env}_{level}-v2.hdf5`; medium-expert is made from medium + expert when absent. Default: the official
    D4RL files ($D4RL_DATASET_DIR, downloaded if missing)"""
    out: Optional[str] = None
    """results folder (default `benchmarks/results/{preset}`)"""
    methods: tuple[str, ...] = ()
    """subset of methods (default: all): dt, dt-gaussian, mo_dt, trdt, rgdt"""
    datasets: tuple[str, ...] = ()
    """subset of datasets (default: the preset's)"""
    seeds: tuple[int, ...] = ()
    """seeds (default: the preset's)"""
    jobs: int = 0
    """jobs at once (0: one per CPU core on CPU, 4 per GPU on CUDA)"""
    device: str = "auto"
    """passed to every job: auto, cpu, cuda"""
    extra: str = ""
    """flags appended to every job's command (part of its key), one quoted string: `--extra="--lr 1e-3"`"""
    dry_run: bool = False
    """list the jobs and whether each is finished, run nothing"""


def dataset_paths(name: str, data_dir: Optional[str]) -> list[str]:
    """Local files for a dataset, or [] for the official resolution inside the method file."""
    if data_dir is None:
        return []
    d = Path(data_dir)
    for cand in (d / f"{name}.hdf5", d / common.d4rl_filename(name)):
        if cand.exists():
            return [str(cand.resolve())]
    if name.endswith("-medium-expert"):  # D4RL's medium-expert is medium and expert concatenated
        env = name.split("-")[0]
        parts = [dataset_paths(f"{env}-{lvl}", data_dir) for lvl in ("medium", "expert")]
        if all(parts):
            return parts[0] + parts[1]
    raise SystemExit(f"error: no file for {name} in {d} (looked for {name}.hdf5 and {common.d4rl_filename(name)}); "
                     "drop it with --datasets or add the file.")


def source_hash(script: str) -> str:
    h = hashlib.sha256()
    for f in (script, "common.py"):
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()


def plan(args: Args) -> list[dict]:
    if args.preset not in PRESETS:
        raise SystemExit(f"error: unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}.")
    p = PRESETS[args.preset]
    methods = args.methods or tuple(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    out = Path(args.out or ROOT / "benchmarks" / "results" / args.preset)
    jobs = []
    for m in methods:
        spec = METHODS[m]
        if not (ROOT / spec["script"]).exists():
            raise SystemExit(f"error: {spec['script']} does not exist yet; drop {m} with --methods.")
        code = source_hash(spec["script"])
        for d in args.datasets or p.get("only", {}).get(m, p["datasets"]):
            common.parse_name(d)
            paths = dataset_paths(d, args.data_dir)
            for s in args.seeds or p["seeds"]:
                cmd = [spec["script"], "--env", d, "--seed", str(s), "--exp-name", m, "--device", args.device,
                       *spec["flags"], *p["common"], *p["flags"].get(m, []), *shlex.split(args.extra)]
                if paths:
                    cmd += ["--dataset-path", *paths]
                key = hashlib.sha256(json.dumps(dict(cmd=cmd, code=code)).encode()).hexdigest()[:12]
                jobs.append(dict(method=m, dataset=d, seed=s, key=key, cmd=cmd, code=code, folder=out / f"{m}__{d}__s{s}__{key}"))
    return jobs


def is_done(job: dict) -> bool:
    return (job["folder"] / "results.json").exists()


def run_job(job: dict, threads: int) -> dict:
    """One job in a subprocess. Its results.json (with the job's key, command and code hash) is moved
    into the job folder only after the method file finished, so a folder with results.json is complete."""
    folder = job["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, *job["cmd"], "--runs-dir", str(folder / "runs")] + (["--threads", str(threads)] if threads else [])
    t0 = time.time()
    with open(folder / "log.txt", "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return dict(job, ok=False, error=f"exit code {rc}, see {folder / 'log.txt'}")
    run_dirs = sorted((folder / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    run = run_dirs[-1]
    res = json.loads((run / "results.json").read_text())
    res["benchmark"] = dict(method=job["method"], label=METHODS[job["method"]]["label"], dataset=job["dataset"], seed=job["seed"],
                            key=job["key"], cmd=job["cmd"], code_sha256=job["code"], job_wall_time_s=time.time() - t0)
    shutil.copy(run / "metrics.jsonl", folder / "metrics.jsonl")
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, folder / "results.json")
    return dict(job, ok=True, score=res["normalized_mean"])


def main(args: Args) -> list[dict]:
    jobs = plan(args)
    todo = [j for j in jobs if not is_done(j)]
    print(f"{len(jobs)} jobs, {len(jobs) - len(todo)} already finished, {len(todo)} to run")
    if args.dry_run:
        for j in jobs:
            print(f"  {'done' if is_done(j) else 'todo'}  {j['folder'].name}")
        return []
    import torch

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    n = args.jobs or (4 * max(1, torch.cuda.device_count()) if cuda else os.cpu_count() or 1)
    threads = 0 if cuda else max(1, (os.cpu_count() or 1) // n)  # CPU: split the cores, do not oversubscribe
    from tqdm import tqdm

    finished = []
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(run_job, j, threads) for j in todo]
        try:
            for f in tqdm(as_completed(futures), total=len(futures), desc=f"jobs ({n} at once)"):
                r = f.result()
                finished.append(r)
                msg = f"{r['method']} {r['dataset']} seed {r['seed']}: " + (f"{r['score']:.1f}" if r["ok"] else f"FAILED ({r['error']})")
                tqdm.write(msg)
        except KeyboardInterrupt:  # finished jobs are on disk; running ones are redone next time
            for f in futures:
                f.cancel()
            raise SystemExit("interrupted: finished jobs are kept; run the same command again to resume.")
    failed = [r for r in finished if not r["ok"]]
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed; see their log.txt. Finished ones are kept.")
    return finished


if __name__ == "__main__":
    main(tyro.cli(Args))
