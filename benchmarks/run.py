"""Train and evaluate methods x datasets x seeds from a preset; the raw material of Tables 1.3
and 2.1.

    python benchmarks/run.py --preset smoke  --data-dir REPLICA               # CPU minutes
    python benchmarks/run.py --preset thesis --data-dir REPLICA               # thesis budgets (GPU)
                                                                              # replica's data only
    python benchmarks/run.py --preset thesis                                  # official D4RL files
    python benchmarks/run.py --preset cpu --methods trdt --extra="--lr 1e-3"  # a variant, own runs
    python benchmarks/aggregate.py benchmarks/results/thesis                  # the tables
    python benchmarks/run.py --preset thesis --ray auto --gpus-per-job 0.25   # on Ray, 4 jobs/GPU

REPLICA: a folder of hdf5 files, e.g. the replica datasets (README).

Each job runs one method file as a subprocess (exactly the command a user would type) in its own
folder `{out}/{method}__{dataset}__s{seed}__{key}`, where `key` hashes the job's full command line
AND the source of the method file and common.py: a different config or code version is a different
folder, so results never mix. A job is finished when its folder holds results.json (written last,
atomically); finished jobs are skipped. A job that stopped half way (Ctrl-C, SIGTERM, a time limit,
a lost node) left a run with a checkpoint (model.pt, saved periodically) and no results.json in its
folder: rerunning the same command continues that run with the job's command plus `--resume RUN`, to
the result it would have had without the stop; it does not start over. The key holds the code, so
this works within one code version: after an edit to the method file or common.py the job is a new
folder and starts from update 0 (the stopped run stays in the old folder; continue it by hand at its
commit, `python SCRIPT --resume RUN`). Jobs run several at once: one per CPU core on CPU, 4 per GPU
spread over every visible GPU (--jobs to change).

With --ray, each job is a task on a Ray cluster instead (README: starting one on SLURM or
Kubernetes): the same jobs, keys and folders, the same resume rule. The task gets this working
tree's code (the code that was hashed) and the job's stopped run if it has one, runs the method file
in a scratch folder on its node and sends the folder back (a failed task's checkpoint too), so the
results folder only has to exist here; the data files (--data-dir) must be at the same path on every
node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# fmt: off
# Which file and flags make each column of Table 1.3 / 2.1, in the thesis's column order
# (baselines first).
METHODS = {
    "bc": dict(script="benchmarks/bc.py", flags=[], label="BC"),
    "bc-10": dict(script="benchmarks/bc.py", flags=["--top-pct", "10"], label="10%BC"),
    "dt": dict(script="dt.py", flags=[], label="DT"),
    "dt-gaussian": dict(script="dt.py", flags=["--policy", "gaussian"],
                        label="DT-Gaussian (ODT-O-style)"),
    "mo_dt": dict(script="mo_dt.py", flags=[], label="MO-DT"),
    "trdt": dict(script="trdt.py", flags=[], label="TRDT"),
    "rgdt": dict(script="rgdt.py", flags=[], label="RGDT"),
    # Fig. 2.3's ablation: only where a preset or --methods names it (default=False), not in
    # every table.
    "rgdt-full": dict(script="rgdt.py", flags=["--full-context-loss"],
                      label="RGDT full-context (Fig. 2.3)", default=False),
}
TABLE_1_3 = [f"{e}-{lvl}" for lvl in ("medium", "medium-replay", "medium-expert")
             for e in ("halfcheetah", "hopper", "walker2d")]
TABLE_2_1 = [f"{e}-{lvl}" for lvl in ("medium", "medium-expert")
             for e in ("halfcheetah", "hopper", "walker2d")]
# Files a method file imports besides common.py: part of its code hash. Only bc.py has any
# (dt.py's plumbing, claims.py's thesis numbers); the method files' keys hash exactly (script,
# common.py), as before.
IMPORTS = {"benchmarks/bc.py": ("dt.py", "benchmarks/claims.py")}

# The two results presets run in fp32 on every machine: their seeds are run on several machines over
# several sessions (some with native bf16, some without), and one column must not mix precisions.
FP32 = ["--no-bf16"]
# A preset: datasets, seeds and per-method flags. `thesis` = the thesis's budgets (each file's
# defaults are the thesis's settings: Table 1.1-1.2 for MO-DT/TRDT, the DT paper's for DT, §2.4 for
# RGDT), 10 seeds.
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "16",
         "--warmup-steps", "10"]
# the DT size (3 layers, 1 head, 128 wide, batch 64) of the CPU presets' Chapter 1 methods
DT_SIZE = ["--n-layer", "3", "--n-head", "1", "--n-embd", "128", "--batch-size", "64"]
PRESETS = {
    "smoke": dict(
        datasets=["hopper-medium-replay"], seeds=[0, 1],
        common=["--eval-episodes", "3", "--eval-every", "0", "--log-every", "10"],
        flags={"dt": SMALL + ["--updates", "40"], "dt-gaussian": SMALL + ["--updates", "40"],
               "mo_dt": SMALL + ["--updates", "40"], "trdt": SMALL + ["--updates", "40"],
               **{m: ["--updates", "40", "--inv-updates", "40", "--batch-size", "16",
                      "--inv-batch-size", "32", "--warmup-steps", "10"]
                  for m in ("rgdt", "rgdt-full")}}
        | {m: ["--updates", "40", "--hidden", "32", "32", "--batch-size", "16"]
           for m in ("bc", "bc-10")},
    ),
    # A budget a 2-core CPU finishes in about an hour: the DT-size network (3 layers, 1 head, 128,
    # batch 64) for every Chapter 1 method, so they compare at equal size and updates; each keeps
    # its own optimizer, learning rate and loss (AdamW for DT, LAMB for MO-DT/TRDT, as in the
    # thesis). BC and 10%BC (CORL's MLP and batch 256, about 3 ms of CPU an update) get 10^4
    # updates, a few CPU minutes: cheap beside the transformers, and past the 5000 at which 10%BC
    # was still improving on this replica; a baseline cut short would flatter the methods beside it.
    "cpu": dict(
        datasets=["hopper-medium-replay"], seeds=[0, 1],
        common=["--eval-episodes", "10", "--eval-every", "500"],
        flags={m: [*DT_SIZE, "--updates", "2000", "--warmup-steps", "500"]
               for m in ("dt", "dt-gaussian", "mo_dt", "trdt")}
        | {m: ["--updates", "2000", "--inv-updates", "2000", "--warmup-steps", "500"]
           for m in ("rgdt", "rgdt-full")}
        | {m: ["--updates", "10000"] for m in ("bc", "bc-10")},
    ),
    # A longer look on the same data (issue "Faithful to Table 1.1"): 2000 updates cannot show the
    # thesis's ordering. 10^4 updates (about half a day of one CPU core per method and seed), an
    # evaluation every 1000; BC and 10%BC 10^5 (minutes).
    "cpu-long": dict(
        datasets=["hopper-medium-replay"], seeds=[0, 1],
        methods=("bc", "bc-10", "dt", "mo_dt", "trdt", "rgdt"),
        common=["--eval-episodes", "10", "--eval-every", "1000"],
        flags={m: [*DT_SIZE, "--updates", "10000", "--warmup-steps", "1000"]
               for m in ("dt", "mo_dt", "trdt")}
        | {m: ["--updates", "10000", "--inv-updates", "10000", "--warmup-steps", "1000"]
           for m in ("rgdt", "rgdt-full")}
        | {m: ["--updates", "100000"] for m in ("bc", "bc-10")},
    ),
    # Table 1.3's hopper-medium-replay row with five seeds (issue 26): cpu-long's DT-size networks
    # and budget for every Chapter 1 method, 20 evaluation episodes every 1000 updates, and BC and
    # 10%BC at the same 10^4 updates, so that every column has the same budget.
    "table13-hmr": dict(
        datasets=["hopper-medium-replay"], seeds=[0, 1, 2, 3, 4],
        methods=("dt", "mo_dt", "trdt", "bc", "bc-10"),
        common=["--eval-episodes", "20", "--eval-every", "1000"],
        flags={m: [*DT_SIZE, "--updates", "10000", "--warmup-steps", "1000", *FP32]
               for m in ("dt", "mo_dt", "trdt")}
        | {m: ["--updates", "10000"] for m in ("bc", "bc-10")},
    ),
    # Table 2.1's hopper-medium row and Fig. 2.3 (issue 26), 3 seeds: RGDT at §2.4's config with
    # both loss variants, DT at the DT size, 10%BC. The budget is the CPU's, not §2.4's: 1.5·10^5
    # translator and 2·10^5 inverse-dynamics updates are five times these, days of a 2-core CPU for
    # the six RGDT runs (README's speed table); 3·10^4 and 5·10^4 keep the two phases near §2.4's
    # ratio (0.6 vs 0.75) and fit in CPU hours. RGDT is evaluated every 5000 translator updates (its
    # inverse dynamics trains first), DT and 10%BC every 1000 of their 10^4.
    "table21-hm": dict(
        datasets=["hopper-medium"], seeds=[0, 1, 2], methods=("rgdt", "rgdt-full", "dt", "bc-10"),
        common=["--eval-episodes", "20"],
        flags={m: ["--updates", "30000", "--inv-updates", "50000", "--eval-every", "5000", *FP32]
               for m in ("rgdt", "rgdt-full")}
        | {"dt": [*DT_SIZE, "--updates", "10000", "--warmup-steps", "1000", "--eval-every", "1000",
                  *FP32],
           "bc-10": ["--updates", "10000", "--eval-every", "1000"]},
    ),
    # Every file's defaults are the thesis's settings (tests/test_benchmarks.py checks them against
    # Tables 1.1-1.2 and §2.4). ODT-O is not the thesis's model: its column is the ODT paper's, run
    # with ODT's configuration (online-dt's main.py: 4 layers, 4 heads, 512 dims, batch 256, lr
    # 1e-4, weight decay 5e-4; §1.5.1 calls MO-DT/TRDT "half the size of the ODT-O model"). dt.py
    # takes that size; it keeps AdamW (ODT: LAMB), DT's timestep embedding and evaluation context
    # 20, and has no entropy bonus, so the column stays "ODT-O-style". BC and 10%BC run CORL's
    # any_percent_bc defaults (10^6 updates).
    "thesis": dict(
        datasets=TABLE_1_3, seeds=list(range(10)),
        common=["--eval-episodes", "10", "--eval-every", "10000"],
        flags={m: [] for m in METHODS}
        | {"dt-gaussian": ["--n-layer", "4", "--n-head", "4", "--n-embd", "512",
                           "--batch-size", "256", "--weight-decay", "5e-4"]},
        only={"rgdt": TABLE_2_1, "rgdt-full": TABLE_2_1},  # Table 2.1: medium, medium-expert rows
    ),
}
# fmt: on


@dataclass
class Args:
    """Train and evaluate methods x datasets x seeds from a preset, several jobs at once, each in a
    folder keyed by its command and code; finished jobs (results.json present) are skipped, so
    rerunning resumes."""

    preset: str = "smoke"
    """`smoke` (CPU minutes, tiny models), `cpu` (equal small budget for every method, CPU hours),
    `cpu-long` (DT, MO-DT, TRDT, RGDT for 10^4 updates with an evaluation every 1000, CPU
    half-days), `table13-hmr` (Table 1.3's hopper-medium-replay row: DT, MO-DT, TRDT, BC, 10%BC,
    10^4 updates, 20 episodes every 1000, seeds 0-4), `table21-hm` (Table 2.1's hopper-medium row
    and Fig. 2.3: RGDT and RGDT full-context at 3·10^4 + 5·10^4 updates, DT, 10%BC, seeds 0-2) or
    `thesis` (the thesis's configurations and 10 seeds; meant for a GPU); every preset also runs the
    BC and/or 10%BC baselines"""
    data_dir: Optional[str] = None
    """a folder of hdf5 files, e.g. the replica datasets (README), named `{dataset}.hdf5` (the
    replica's names) or as the official `{env}_{level}-v2.hdf5`; medium-expert is made from medium +
    expert when absent. Default: the official D4RL files ($D4RL_DATASET_DIR, downloaded if
    missing)"""
    out: Optional[str] = None
    """results folder (default `benchmarks/results/{preset}`)"""
    methods: tuple[str, ...] = ()
    """subset of methods (default: the preset's): bc, bc-10, dt, dt-gaussian, mo_dt, trdt, rgdt, and
    rgdt-full (RGDT with --full-context-loss, Fig. 2.3; run only where named here or by a preset)"""
    datasets: tuple[str, ...] = ()
    """datasets (default: the preset's; with --data-dir, those of the preset that have files there,
    the others listed as skipped)"""
    seeds: tuple[int, ...] = ()
    """seeds (default: the preset's)"""
    jobs: int = 0
    """jobs at once here (0: one per CPU core on CPU, 4 per GPU on CUDA; jobs are spread over all
    visible GPUs); with --ray the cluster's free resources decide instead"""
    device: str = "auto"
    """passed to every job: auto, cpu, cuda"""
    extra: str = ""
    """flags appended to every job's command (part of its key), one quoted string: `--extra="--lr
    1e-3"`"""
    dry_run: bool = False
    """list the jobs and whether each is finished, run nothing"""
    ray: Optional[str] = None
    """run each job as a task on a Ray cluster: `auto` (the cluster this machine is part of, e.g.
    after `ray start`), an address (`HOST:6379`, or `ray://HOST:10001` through Ray Client) or
    `local` (start a Ray instance on this machine). Needs the extra: pip install -e ".[ray]".
    Default: jobs run here"""
    cpus_per_job: float = 1.0
    """with --ray: CPUs Ray reserves for each job; the job's torch threads are this rounded up"""
    gpus_per_job: float = 0.0
    """with --ray: GPUs Ray reserves for each job; a fraction shares one GPU (0.25: 4 jobs per GPU),
    above 1 a whole number. 0: the job gets no GPU and runs on CPU"""


def dataset_paths(name: str, data_dir: Optional[str]) -> list[str]:
    """Local files for a dataset, or [] for the official resolution inside the method file."""
    if data_dir is None:
        return []
    d = Path(data_dir)
    if not d.is_dir():
        raise SystemExit(
            f"error: --data-dir {data_dir}: no such folder; pass a folder of hdf5 files, e.g. the "
            "replica datasets (README), or leave it out for the official D4RL files."
        )

    def find(n):
        return next(
            (
                str(c.resolve())
                for c in (d / f"{n}.hdf5", d / common.d4rl_filename(n))
                if c.exists()
            ),
            None,
        )

    if find(name):
        return [find(name)]
    if name.endswith("-medium-expert"):  # D4RL's medium-expert is medium and expert concatenated
        parts = [find(name.replace("-medium-expert", f"-{lvl}")) for lvl in ("medium", "expert")]
        if all(parts):
            return parts
    also = " (or its -medium and -expert files)" if name.endswith("-medium-expert") else ""
    raise SystemExit(
        f"error: no file for {name} in {d} (looked for {name}.hdf5 and "
        f"{common.d4rl_filename(name)}{also}); drop it with --datasets or add the file."
    )


def source_hash(script: str) -> str:
    h = hashlib.sha256()
    for f in (script, "common.py", *IMPORTS.get(script, ())):
        h.update((ROOT / f).read_bytes())
    return h.hexdigest()


def check_ray_flags(args: Args) -> None:
    """The resource flags mean something only with --ray, and Ray refuses fractions of more than one
    GPU."""
    if args.ray is None:
        if args.cpus_per_job != 1.0 or args.gpus_per_job != 0.0:
            raise SystemExit(
                "error: --cpus-per-job / --gpus-per-job size Ray tasks; add --ray auto (or an "
                "address), or use --jobs for jobs on this machine."
            )
        return
    if args.jobs:
        raise SystemExit(
            f"error: --jobs {args.jobs} is for jobs on this machine; with --ray, --cpus-per-job "
            "and --gpus-per-job decide how many run at once."
        )
    if not args.cpus_per_job > 0:
        raise SystemExit(f"error: --cpus-per-job {args.cpus_per_job}: must be > 0.")
    if not args.gpus_per_job >= 0 or (
        args.gpus_per_job > 1 and args.gpus_per_job != int(args.gpus_per_job)
    ):
        raise SystemExit(
            f"error: --gpus-per-job {args.gpus_per_job}: must be a fraction in [0, 1] (0.25: 4 "
            "jobs per GPU) or a whole number of GPUs."
        )
    if args.device.startswith("cuda") and args.gpus_per_job == 0:
        raise SystemExit(
            f"error: --device {args.device} with --ray needs GPUs reserved: add --gpus-per-job "
            "(e.g. 0.25 for 4 jobs per GPU)."
        )


def plan(args: Args) -> list[dict]:
    if args.preset not in PRESETS:
        raise SystemExit(
            f"error: unknown --preset {args.preset!r}; choose from {', '.join(PRESETS)}."
        )
    p = PRESETS[args.preset]
    methods = args.methods or p.get(
        "methods", tuple(m for m, spec in METHODS.items() if spec.get("default", True))
    )
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
    if args.jobs < 0:
        raise SystemExit(
            f"error: --jobs {args.jobs}: pass a positive number, or 0 for the default."
        )
    if any(s < 0 for s in args.seeds):  # numpy and the env seeds take no negative seed
        seeds = " ".join(map(str, args.seeds))
        raise SystemExit(f"error: --seeds {seeds}: every seed must be >= 0, e.g. --seeds 0 1 2.")
    check_ray_flags(args)
    for d in args.datasets:
        try:
            common.parse_name(d)
        except common.DatasetError as e:
            raise SystemExit(f"error: --datasets: {e}") from None
    out = Path(args.out or ROOT / "benchmarks" / "results" / args.preset)
    jobs, skipped = [], set()
    for m in methods:
        spec = METHODS[m]
        if not (ROOT / spec["script"]).exists():
            raise SystemExit(
                f"error: {spec['script']} does not exist yet; drop {m} with --methods."
            )
        code = source_hash(spec["script"])
        for d in args.datasets or p.get("only", {}).get(m, p["datasets"]):
            try:
                paths = dataset_paths(d, args.data_dir)
            except SystemExit:
                # asked for by name, or no folder at all
                if args.datasets or not Path(args.data_dir).is_dir():
                    raise
                skipped.add(d)  # a preset's dataset the local folder lacks (the replica has five)
                continue
            for s in args.seeds or p["seeds"]:
                cmd = [spec["script"], "--env", d, "--seed", str(s), "--exp-name", m,
                       "--device", args.device, *spec["flags"], *p["common"],
                       *p["flags"].get(m, []), *shlex.split(args.extra)]  # fmt: skip
                if paths:
                    cmd += ["--dataset-path", *paths]
                key = hashlib.sha256(json.dumps(dict(cmd=cmd, code=code)).encode()).hexdigest()[:12]
                folder = out / f"{m}__{d}__s{s}__{key}"
                jobs.append(
                    dict(method=m, dataset=d, seed=s, key=key, cmd=cmd, code=code, folder=folder)
                )
    if skipped:
        print(f"skipped (no file in {args.data_dir}): {', '.join(sorted(skipped))}")
    if not jobs:
        raise SystemExit(
            f"error: no jobs: none of the preset's datasets has a file in {args.data_dir}; name "
            "them with --datasets."
        )
    return jobs


def is_done(job: dict) -> bool:
    return (job["folder"] / "results.json").exists()


def takes_resume(script: Path) -> bool:
    """Whether a method file has --resume (an `Args.resume` field): those that do save resumable
    checkpoints."""
    text = script.read_text() if script.is_file() else ""
    return re.search(r"^    resume: Optional\[str\] = None$", text, re.M) is not None


def stopped_run(job: dict, root: Path = ROOT) -> Optional[Path]:
    """The job's run that stopped half way with a checkpoint (model.pt, no results.json), newest
    checkpoint first, when its method file (in `root`) can continue it; None: the job starts a new
    run."""
    runs = job["folder"] / "runs"
    if not runs.is_dir() or not takes_resume(root / job["cmd"][0]):
        return None
    stopped = [
        r for r in runs.iterdir() if (r / "model.pt").is_file() and (r / "config.json").is_file()
    ]
    stopped = [r for r in stopped if not (r / "results.json").exists()]
    return max(stopped, key=lambda r: (r / "model.pt").stat().st_mtime, default=None)


def last_error(log: Path) -> Optional[str]:
    """The one line that says why the last attempt in a job's log.txt failed: its last `error: ...`
    line (a method file's message for bad input), else the exception line of a traceback, else the
    line a stopped run printed (`interrupted (SIGTERM): ...`)."""
    # after its command
    attempt = log.read_text(errors="replace").rsplit("\n$ ", 1)[-1].splitlines()[1:]
    lines = [x.strip() for x in attempt if x.strip()]
    for pattern in (
        r"^error: ",
        r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*",
        r"^interrupted \(",
    ):
        found = [x for x in lines if re.match(pattern, x)]
        if found:
            return found[-1]
    return None


# The job processes running now and the stop signal run.py got, if any (stops_forwarded). No lock:
# set.add, set.copy and a dict item's store are atomic under the GIL, and each side writes before it
# reads the other's, so a job listed as a signal comes is sent it at least once (a lock would also
# keep Ray from pickling run_job for its tasks).
RUNNING = {"procs": set(), "signal": None}


def job_process(cmd: list[str], cwd: Path, log, env: dict) -> int:
    """A job's command, run to its end; its exit code. While it runs it is in RUNNING, so that a
    stop signal run.py gets reaches it too (one that came before it was listed is sent at once)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    RUNNING["procs"].add(proc)
    if RUNNING["signal"] is not None:
        proc.send_signal(RUNNING["signal"])
    try:
        return proc.wait()
    finally:
        RUNNING["procs"].discard(proc)


@contextlib.contextmanager
def stops_forwarded():
    """Ctrl-C, SIGTERM and SIGUSR1 that reach run.py pass on to every running job, which saves a
    checkpoint and exits; then run.py stops as on Ctrl-C. Without it a signal sent to run.py alone
    (`kill PID`, a container's PID 1 under Kubernetes, a scheduler that signals one process) would
    end run.py and leave its jobs running unwatched, to be started a second time by the next
    run. A job also reached through its process group gets two copies: the method files act on the
    first (catch_stop_signals). A signal the shell set to be ignored (SIGINT under `&`, `nohup`)
    stays ignored; only the main thread can catch signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum, frame):
        first, RUNNING["signal"] = RUNNING["signal"] is None, signum
        for proc in RUNNING["procs"].copy():
            if proc.poll() is None:
                proc.send_signal(signum)
        if first:  # a later one only passes on: run.py is already waiting for its jobs to save
            raise KeyboardInterrupt

    names = [n for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n)]
    signums = [getattr(signal, n) for n in names]
    RUNNING["signal"] = None
    old = {s: signal.signal(s, forward) for s in signums if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def run_job(job: dict, threads: int, gpu: Optional[str] = None, root: Path = ROOT) -> dict:
    """One job in a subprocess (on GPU `gpu` when given), run from the code in `root`; a run of the
    job that stopped half way is continued (the job's command plus --resume RUN: the same flags, so
    the method file accepts them). Its results.json (with the job's key, command and code hash) is
    moved into the job folder only after the method file finished, so a folder with results.json is
    complete; a failed or killed job leaves none and runs again next time, from its last
    checkpoint."""
    folder = job["folder"]
    folder.mkdir(parents=True, exist_ok=True)
    stopped = stopped_run(job, root)
    threads_flag = ["--threads", str(threads)] if threads else []
    resume_flag = ["--resume", str(stopped)] if stopped is not None else []
    cmd = [
        sys.executable,
        *job["cmd"],
        "--runs-dir",
        str(folder / "runs"),
        *threads_flag,
        *resume_flag,
    ]
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {})
    t0 = time.time()
    try:
        with open(folder / "log.txt", "a") as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            rc = job_process(cmd, root, log, env)
        if rc != 0:
            why = last_error(folder / "log.txt")
            return dict(job, ok=False, error=f"exit code {rc}, see {folder / 'log.txt'}", why=why)
        # this attempt's run folder: the one it continued, else the newest
        run = stopped or max((folder / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
        res = json.loads((run / "results.json").read_text())
        label = METHODS[job["method"]]["label"]
        res["benchmark"] = dict(method=job["method"], label=label, dataset=job["dataset"],
                                seed=job["seed"], key=job["key"], cmd=job["cmd"],
                                code_sha256=job["code"], job_wall_time_s=time.time() - t0,
                                machine=machine(res, gpu))  # fmt: skip
        shutil.copy(run / "metrics.jsonl", folder / "metrics.jsonl")
        config = json.loads((run / "config.json").read_text()) | {
            "machine": res["benchmark"]["machine"]
        }
        (folder / "config.json").write_text(json.dumps(config, indent=1))
        tmp = folder / "results.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, folder / "results.json")
    except (OSError, ValueError, KeyError) as e:
        # e.g. the method file wrote no results.json: this job fails, not the batch
        return dict(job, ok=False, error=f"{type(e).__name__}: {e}; see {folder / 'log.txt'}")
    return dict(job, ok=True, score=res["normalized_mean"])


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        names = [
            x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")
        ]
    except OSError:
        names = []
    return (
        names[0].split(":", 1)[1].strip()
        if names
        else platform.processor() or platform.machine() or "unknown"
    )


def gpu_model(gpu: Optional[str]) -> Optional[str]:
    """The name of the job's GPU (`gpu`, else the first of CUDA_VISIBLE_DEVICES, as Ray sets it),
    from nvidia-smi; None where it cannot tell."""
    which = (
        gpu if gpu is not None else (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    )
    try:
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(which)]
        out = subprocess.run(query, capture_output=True, text=True, timeout=60)
    except Exception:  # no nvidia-smi, or it hangs
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def machine(res: dict, gpu: Optional[str]) -> dict:
    """Where a job's numbers were measured (issue 26): the device, the CPU model (and the GPU's on
    CUDA), whether bf16 was active, the torch version. The method files record the device, bf16 and
    torch; the models are added here, by the process that ran the job on its machine (a Ray task: on
    its node)."""
    cuda = str(res.get("device", "")).startswith("cuda")
    gpu_name = gpu_model(gpu) if cuda else None
    return dict(
        device=res.get("device"),
        cpu=cpu_model(),
        gpu=gpu_name,
        bf16=res.get("bf16"),
        torch=res.get("torch"),
    )


def report(r: dict) -> str:
    outcome = f"{r['score']:.1f}" if r["ok"] else f"FAILED ({r['error']})"
    if not r["ok"] and r.get("why"):  # the failed job's own last error line
        outcome += f": {r['why']}"
    return f"{r['method']} {r['dataset']} seed {r['seed']}: {outcome}"


def run_here(todo: list[dict], args: Args) -> list[dict]:
    """The jobs as subprocesses on this machine, several at once."""
    import torch
    from tqdm import tqdm

    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if cuda else 0
    n = args.jobs or (4 * max(1, gpus) if cuda else os.cpu_count() or 1)
    # split the cores (the env steps on CPU even for GPU jobs)
    threads = max(1, (os.cpu_count() or 1) // n)
    # Worker slot i runs its jobs on GPU i % gpus (by CUDA_VISIBLE_DEVICES), so jobs spread over
    # every GPU; not when the user pinned one with --device cuda:N.
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = pinned.split(",") if pinned else [str(i) for i in range(gpus)]
    spread = gpus > 1 and args.device in ("auto", "cuda")
    slots = queue.Queue()
    for i in range(n):
        slots.put(visible[i % gpus] if spread else None)

    def on_a_slot(job):
        slot = slots.get()
        try:
            return run_job(job, threads, slot)
        finally:
            slots.put(slot)

    finished = []
    with stops_forwarded(), ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(on_a_slot, j) for j in todo]
        try:
            for f in tqdm(as_completed(futures), total=len(futures), desc=f"jobs ({n} at once)"):
                finished.append(f.result())
                tqdm.write(report(finished[-1]))
        except KeyboardInterrupt:  # finished jobs are on disk; running ones are redone next time
            for f in futures:
                f.cancel()
            raise SystemExit(
                "interrupted: finished jobs are kept, stopped ones saved a checkpoint; run the "
                "same command again to continue them."
            )
    return finished


# --------------------------------------------------------------------------------------------------
# Ray: the same jobs as tasks on a cluster. Planning, keys and the resume rule stay here on the
# driver; a task only runs the job's command and hands back its folder.
# --------------------------------------------------------------------------------------------------

# Not shipped with the code: history, results, runs, data, caches (Ray caps the upload's size).
SHIP_EXCLUDES = [".git", "runs", "benchmarks/results", "*.pt", "*.hdf5", "*.h5", "*.pkl", "*.mp4",
                 ".whl", ".gl", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache",
                 "*.egg-info", "MUJOCO_LOG.TXT"]  # fmt: skip


def ray_job(job: dict, threads: int, stopped: Optional[dict] = None) -> tuple[dict, dict]:
    """A Ray task: run one job from the shipped code (Ray makes it the task's working directory) in
    a scratch folder on the task's node, and return the result and every file of the job folder, so
    that the results folder needs no filesystem shared with the nodes. `stopped`: the files of the
    job's stopped run (path in the job folder -> bytes), put back into the scratch folder first, so
    that run_job continues that run."""
    import platform

    scratch = Path(tempfile.mkdtemp(prefix="seqrl-job-"))
    folder = scratch / job["folder"].name
    for rel, data in (stopped or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    try:
        # the GPU: Ray's CUDA_VISIBLE_DEVICES
        r = run_job(dict(job, folder=folder), threads, root=Path.cwd())
        files = {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return dict(r, folder=job["folder"], scratch=str(folder), node=platform.node()), files
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stopped_run_files(job: dict) -> dict:
    """The files of the job's stopped run, for ray_job to continue it (a checkpoint's unfinished
    .tmp left out); {} when the job has none."""
    run = stopped_run(job)
    if run is None:
        return {}
    files = [p for p in sorted(run.rglob("*")) if p.is_file() and not p.name.endswith(".tmp")]
    return {str(p.relative_to(job["folder"])): p.read_bytes() for p in files}


def land(job: dict, r: dict, files: dict, commit: Optional[str], address: str) -> dict:
    """A Ray job's files into its folder here, results.json last and atomically (the resume rule, as
    for a local job). The run folder's path and the commit become this checkout's: the shipped code
    had no .git."""
    folder = job["folder"]
    for rel, data in files.items():
        if rel not in ("results.json", "log.txt"):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "ab") as log:  # appended, like a local job's attempts
        log.write(files.get("log.txt", b""))
    if not r["ok"]:
        here = {k: r[k].replace(r["scratch"], str(folder)) for k in ("error", "why") if r.get(k)}
        return dict(
            job, ok=False, why=here.get("why"), error=here["error"] + f" (ran on {r['node']})"
        )
    res = json.loads(files["results.json"])
    res["run_dir"] = str(folder / "runs" / Path(res["run_dir"]).name)
    res["git_commit"] = res.get("git_commit") or commit
    res["benchmark"]["ray"] = dict(address=address, node=r["node"])
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, folder / "results.json")
    return dict(job, ok=True, score=res["normalized_mean"])


def connect_ray(args: Args, runtime_env: dict):
    """Ray, connected to --ray's cluster with `runtime_env` for every task (Ray ships a local
    working_dir only when it is given to ray.init, so this process must be the one that
    connects)."""
    try:
        import ray
    except ImportError:
        raise SystemExit(
            'error: --ray needs Ray, an optional extra: pip install -e ".[ray]"'
        ) from None
    if ray.is_initialized():
        raise SystemExit(
            "error: Ray is already initialized in this process; run.py connects by itself, to "
            "ship this checkout's code with ray.init: call ray.shutdown() first, or run run.py as "
            "a script."
        )
    # Ray refuses it for a cluster
    started_here = dict(include_dashboard=False) if args.ray == "local" else {}
    try:
        ray.init(address=args.ray, runtime_env=runtime_env, logging_level="WARNING", **started_here)
    except Exception as e:
        # no cluster at that address, a refused connection, a version mismatch: one message
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(
            f"error: --ray {args.ray}: cannot connect ({why}). Start a cluster first (`ray start "
            "--head`, README), pass its address, or use --ray local."
        ) from None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(
        n.get("CPU", 0) >= args.cpus_per_job and n.get("GPU", 0) >= args.gpus_per_job for n in nodes
    ):
        print(f"warning: no node of the Ray cluster has {args.cpus_per_job:g} CPU(s) and "
              f"{args.gpus_per_job:g} GPU(s): the jobs wait until such a node joins (an "
              "autoscaler), or Ctrl-C and lower --cpus-per-job / --gpus-per-job.")  # fmt: skip
    return ray


def git_head() -> Optional[str]:
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return git.stdout.strip() if git.returncode == 0 else None


def run_on_ray(todo: list[dict], args: Args) -> list[dict]:
    """Every job as a Ray task with --cpus-per-job CPUs and --gpus-per-job GPUs; Ray runs as many at
    once as the cluster's free resources allow, and retries a task whose worker died."""
    from tqdm import tqdm

    if not todo:
        return []
    excludes = list(SHIP_EXCLUDES)
    out = todo[0]["folder"].parent.resolve()
    if out.is_relative_to(ROOT):  # a results folder inside the checkout stays here
        excludes.append(str(out.relative_to(ROOT)))
    ray = connect_ray(args, dict(working_dir=str(ROOT), excludes=excludes))
    # imported (tests, notebooks): the workers cannot import this file by name
    if __name__ != "__main__":
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    task = ray.remote(num_cpus=args.cpus_per_job, num_gpus=args.gpus_per_job)(ray_job)
    threads, commit, finished = math.ceil(args.cpus_per_job), git_head(), []
    refs = {
        task.options(name=job["folder"].name).remote(job, threads, stopped_run_files(job)): job
        for job in todo
    }
    pending = list(refs)
    bar = tqdm(
        total=len(refs),
        desc=f"jobs on Ray ({args.cpus_per_job:g} CPU, {args.gpus_per_job:g} GPU each)",
    )
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            job = refs[ready[0]]
            try:
                r, files = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                # the task itself failed (node lost, out of memory): this job only
                why = str(e).strip().splitlines()[0] if str(e).strip() else ""
                finished.append(
                    dict(job, ok=False, error=f"Ray task failed: {type(e).__name__}: {why}")
                )
            else:
                finished.append(land(job, r, files, commit, args.ray))
            bar.update()
            tqdm.write(report(finished[-1]))
    except KeyboardInterrupt:  # finished jobs are on disk; the cluster's running tasks are stopped
        for ref in pending:
            ray.cancel(ref, force=True)
        raise SystemExit(
            "interrupted: finished jobs are kept, stopped ones keep the checkpoint they last sent "
            "back; run the same command again to continue them."
        )
    finally:
        bar.close()
        ray.shutdown()  # disconnects; stops the instance only when --ray local started it
    return finished


def main(args: Args) -> list[dict]:
    jobs = plan(args)
    todo = [j for j in jobs if not is_done(j)]
    resumed = {j["key"] for j in todo if stopped_run(j) is not None}
    print(
        f"{len(jobs)} jobs, {len(jobs) - len(todo)} already finished, {len(todo)} to run"
        + (f" ({len(resumed)} continue a stopped run)" if resumed else "")
    )
    if args.dry_run:
        for j in jobs:
            state = "done" if is_done(j) else "resume" if j["key"] in resumed else "todo"
            print(f"  {state:6}  {j['folder'].name}")
        return []
    finished = run_on_ray(todo, args) if args.ray is not None else run_here(todo, args)
    failed = [r for r in finished if not r["ok"]]
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed; see their log.txt. Finished ones are kept.")
    return finished


if __name__ == "__main__":
    main(tyro.cli(Args))
