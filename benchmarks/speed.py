"""Speed of every method file on this machine: training updates/s and evaluation env-steps/s, at the
default and the thesis-size configs, in each precision the device offers, and the vectorized
evaluation against one episode at a time.

    python benchmarks/speed.py --data-dir DIR          # CPU: a few minutes
    python benchmarks/speed.py --data-dir DIR --updates 300 --device cuda
    python benchmarks/speed.py --data-dir DIR --out runs/s.json --budget-s 420   # again: goes on

DIR is a folder of replica hdf5 files (see README). Precisions: on a CPU fp32, and bf16 autocast
when the CPU has it natively (AVX512-BF16 or AMX; elsewhere the method files stay in fp32, so there
is nothing to compare); on CUDA fp32, bf16, and bf16 with --compile. `--precisions` names others,
such as `bf16 + CUDA graph` (recorded as not supported when the method file has no flag for it).

Each measurement runs the method file as a user would (a subprocess) and reads the updates/s and
env-steps/s it records in results.json. A compiled run's compile time is reported apart, from the
method file's `compile_time_s`; where a file does not record it, its updates/s include the compile
and are marked so, not compared. Evaluation is timed on halfcheetah by default: its episodes never
terminate early, so every episode is 1000 steps with a full context (hopper's early falls would
flatter the numbers). One-episode-at-a-time is the same trained checkpoint evaluated with
--eval-episodes 1.

A failing measurement is recorded with its last error line and the others go on. The JSON is
written after every measurement, to runs/speed__{device}__{time}.json (or --out-dir, or --out);
given an --out that exists, the measurements already in it are kept and skipped, so a stopped run
(--budget-s, a killed call) goes on where it stopped. A table is printed at the end.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from run import dataset_paths  # noqa: E402

# Table 1.1's size, and the DT paper's
THESIS_SIZE = ["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--batch-size", "256"]
DT_SIZE = ["--n-layer", "3", "--n-head", "1", "--n-embd", "128", "--batch-size", "64"]
CONFIGS = {  # (method, config name) -> script and flags; mo_dt/trdt/rgdt defaults ARE the thesis's
    ("dt", "default (DT paper)"): ("dt.py", []),
    ("dt", "thesis size (Table 1.1)"): ("dt.py", THESIS_SIZE),
    ("mo_dt", "DT size"): ("mo_dt.py", DT_SIZE),
    ("mo_dt", "default = Table 1.1"): ("mo_dt.py", []),
    ("trdt", "DT size"): ("trdt.py", DT_SIZE),
    ("trdt", "default = Table 1.1"): ("trdt.py", []),
    ("rgdt", "default = §2.4"): ("rgdt.py", []),
}
# Precision -> flags; a CUDA graph's flags depend on the method file (see cuda_graph_flags).
PRECISIONS = {"fp32": ["--no-bf16"], "bf16": ["--bf16"], "bf16 + compile": ["--bf16", "--compile"],
              "bf16 + CUDA graph": None}  # fmt: skip
DONE = ("ok", "unsupported")  # a measurement in one of these states is not measured again


@dataclass
class Args:
    """Training updates/s and evaluation env-steps/s of every method file (default and thesis
    configs), vectorized evaluation against one episode at a time; JSON out, table printed."""

    data_dir: Optional[str] = None
    """a folder of replica hdf5 files, see README; default: official D4RL resolution"""
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
    precisions: tuple[str, ...] = ()
    """precisions to measure (fp32, bf16, `bf16 + compile`, `bf16 + CUDA graph`); default: fp32 and
    native bf16 on a CPU, fp32, bf16 and `bf16 + compile` on CUDA"""
    device: str = "auto"
    """auto, cpu or cuda"""
    single: bool = True
    """also evaluate one episode at a time (same checkpoint) for the comparison"""
    out_dir: str = str(ROOT / "runs")
    """folder of the new JSON file speed__{device}__{time}.json"""
    out: Optional[str] = None
    """the JSON file itself, instead of a new one in --out-dir; if it exists, its measurements are
    kept and not measured again (failed ones are tried once more)"""
    budget_s: float = 0.0
    """start no measurement after this many seconds and stop a running one then (0: no limit); a
    rerun with the same --out measures what is left"""
    timeout_s: float = 0.0
    """stop any one measurement (a subprocess) after this many seconds (0: no limit)"""
    extra_flags: str = ""
    """flags for every run, after the config's, in one string (e.g. `"--n-layer 1 --threads 1"`, a
    tiny size for a dry run)"""


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def run(script: str, flags: list[str], runs_dir: str, timeout: Optional[float]) -> dict:
    """One run of a method file; its results.json, or {"status": ..., "error": ...} when it failed
    or ran out of time (then it is killed with every process it started, compile workers too)."""
    cmd = [sys.executable, script, *flags, "--runs-dir", runs_dir]
    before = set(Path(runs_dir).iterdir())
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # fmt: skip
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        why = f"timed out after {timeout:.0f} s; last output: {last_line(out or '')}"
        return dict(status="timed out", error=why)
    if p.returncode != 0:
        why = f"exit {p.returncode}: {last_line(out)}"
        return dict(status="failed", error=why, command=" ".join(cmd))
    new = [d for d in Path(runs_dir).iterdir() if d not in before and (d / "results.json").exists()]
    if not new:
        return dict(status="failed", error="finished without a results.json", command=" ".join(cmd))
    return json.loads((new[0] / "results.json").read_text()) | {"status": "ok"}


def cpu_model() -> str:
    """The processor's marketing name (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_precisions(cuda: bool, bf16_native: bool) -> list[str]:
    """Every precision worth measuring on this device by default."""
    if cuda:
        return ["fp32", "bf16", "bf16 + compile"]
    return ["fp32"] + (["bf16"] if bf16_native else [])


def cuda_graph_flags(script: str) -> Optional[list[str]]:
    """The flags that replay a method file's update as a CUDA graph, read off its --help; None when
    it has none (today's files compile the model only)."""
    p = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    if "--cuda-graph" in p.stdout:
        return ["--bf16", "--cuda-graph"]
    if "--compile-mode" in p.stdout:
        return ["--bf16", "--compile", "--compile-mode", "reduce-overhead"]
    return None


def compile_timing(res: dict, compiled: bool) -> dict:
    """Compile time apart from training speed: the method file's compile_time_s when it records it;
    without it a compiled run's updates/s include the compile and are marked so."""
    info = {k: v for k, v in res.items() if "compile" in k or "graph" in k}
    if not compiled:
        return {}
    if "compile_time_s" in res:
        return dict(compile_time_s=res["compile_time_s"], compile_info=info)
    why = "compile time counted as training time (the method file records no compile_time_s)"
    return dict(compile_time_s=None, compile_info=info, train_speed_note=why)


def measure_row(todo: tuple, args: Args, base: list[str], tmp: str, timeout) -> dict:
    """One row: a training run of a method file in one precision (and, for the first precision, the
    same checkpoint evaluated one episode at a time)."""
    (method, config), (script, flags), precision, first = todo
    row = dict(method=method, config=config, precision=precision, updates=args.updates,
               eval_episodes=args.eval_episodes)  # fmt: skip
    pflags = PRECISIONS[precision]
    pflags = cuda_graph_flags(script) if pflags is None else pflags
    if pflags is None:
        why = f"not supported by this code ({script} --help has no --cuda-graph or --compile-mode)"
        return row | dict(status="unsupported", error=why, flags=flags)
    budget = ["--updates", str(args.updates), "--warmup-steps", "10", "--eval-every", "0"]
    budget += ["--inv-updates", str(args.updates)] if method == "rgdt" else []
    extra = shlex.split(args.extra_flags)
    row["flags"] = flags + extra + pflags
    episodes = ["--eval-episodes", str(args.eval_episodes)]
    res = run(script, base + flags + extra + budget + pflags + episodes, tmp, timeout())
    if res["status"] != "ok":
        return row | res
    compiled = bool({"--compile", "--cuda-graph"} & set(pflags))
    row |= dict(status="ok", device=res["device"], bf16_used=res.get("bf16"),
                train_updates_per_s=res["train_updates_per_s"],
                eval_env_steps_per_s=res["eval_env_steps_per_s"],
                eval_mean_length=sum(res["lengths"]) / len(res["lengths"]),
                dataset_source=res["dataset"]["source"],
                **compile_timing(res, compiled))  # fmt: skip
    if "inv_train_updates_per_s" in res:  # rgdt's second model, the inverse dynamics
        row["inv_train_updates_per_s"] = res["inv_train_updates_per_s"]
    if args.single and first:  # the vectorized evaluation's gain does not depend on the precision
        ckpt = str(Path(res["run_dir"]) / "model.pt")
        eval_only = ["--checkpoint", ckpt, *extra, "--updates", "0", "--eval-episodes", "1"]
        eval_only += pflags
        eval_only += ["--inv-updates", "0"] if method == "rgdt" else []
        one = run(script, ["--device", args.device] + eval_only, tmp, timeout())
        if one["status"] == "ok":
            row["eval_single_env_steps_per_s"] = one["eval_env_steps_per_s"]
            row["vectorized_speedup"] = row["eval_env_steps_per_s"] / one["eval_env_steps_per_s"]
        else:
            row["single_error"] = one["error"]
    return row


def plan(args: Args, variants: list[str]) -> list[tuple]:
    """(config key, script and flags, precision, first precision?) of every measurement asked
    for."""
    todo = [(k, v) for k, v in CONFIGS.items() if k[0] in args.methods and (ROOT / v[0]).exists()]
    todo = [(k, v) for k, v in todo if not args.configs or k[1].startswith(tuple(args.configs))]
    return [(k, v, p, i == 0) for k, v in todo for i, p in enumerate(variants)]


def key(row: dict) -> tuple:
    return row["method"], row["config"], row["precision"]


def derived(rows: list[dict], first: str) -> None:
    """Each row's gain over the first precision of the same config (fp32), where both are training
    speeds (ran, and no compile time inside)."""
    fair = {key(r)[:2]: r for r in rows if r["precision"] == first and r.get("status") == "ok"}
    for r in rows:
        base = fair.get(key(r)[:2])
        ok = r.get("status") == "ok" and "train_speed_note" not in r and base is not None
        speedup = r["train_updates_per_s"] / base["train_updates_per_s"] if ok else None
        r["speedup_vs_" + first.replace(" ", "")] = speedup


def git_commit() -> Optional[str]:
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True)  # fmt: skip
        return git.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def save(path: Path, report: dict) -> None:
    """The whole report, replaced at once: a call killed while writing leaves the previous one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def output_path(args: Args, device: str) -> Path:
    if args.out:
        return Path(args.out)
    return Path(args.out_dir) / f"speed__{device.replace(':', '')}__{int(time.time())}.json"


def load_previous(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        why = "not a JSON file; pass a new file or fix it"
        raise SystemExit(f"error: --out {path}: {why}.") from None


def check(args: Args) -> None:
    known = sorted({m for m, _ in CONFIGS})
    if not args.methods or any(m not in known for m in args.methods):
        given = " ".join(args.methods)
        raise SystemExit(f"error: --methods {given}: choose from {', '.join(known)}.")
    if args.updates < 1 or args.eval_episodes < 1:
        raise SystemExit("error: --updates and --eval-episodes must be at least 1.")
    if any(p not in PRECISIONS for p in args.precisions):
        given = ", ".join(args.precisions)
        raise SystemExit(f"error: --precisions {given}: choose from {', '.join(PRECISIONS)}.")
    if args.budget_s < 0 or args.timeout_s < 0:
        raise SystemExit("error: --budget-s and --timeout-s must be >= 0 (0: no limit).")


def measure_all(args: Args, todo: list, report: dict, path: Path, base: list[str]) -> None:
    """Every measurement not yet done, the JSON rewritten after each; stops at --budget-s."""
    from tqdm import tqdm

    t0, rows, before = time.time(), report["rows"], report.get("wall_time_s", 0.0)
    index = {key(r): i for i, r in enumerate(rows)}

    def timeout() -> Optional[float]:
        limits = [args.timeout_s] if args.timeout_s else []
        limits += [args.budget_s - (time.time() - t0)] if args.budget_s else []
        return max(1.0, min(limits)) if limits else None

    with tempfile.TemporaryDirectory() as tmp:
        for item in tqdm(todo, desc="speed"):
            k = (item[0][0], item[0][1], item[2])
            old = rows[index[k]] if k in index else None
            if old is not None and (old.get("status") in DONE or old.get("attempts", 0) >= 2):
                continue
            if args.budget_s and args.budget_s - (time.time() - t0) < 1:  # no time to start one
                tqdm.write(f"budget of {args.budget_s:.0f} s spent: the rest is left for a rerun")
                break
            row = measure_row(item, args, base, tmp, timeout)
            spent = args.budget_s and time.time() - t0 >= args.budget_s - 2
            if row["status"] == "timed out" and spent:
                row["status"] = "stopped (budget)"  # not its own fault: tried again, not counted
            elif row["status"] not in DONE:
                row["attempts"] = (old or {}).get("attempts", 0) + 1
            if k not in index:
                index[k] = len(rows)
                rows.append(row)
            rows[index[k]] = row
            report["wall_time_s"] = before + time.time() - t0
            save(path, report)
            tqdm.write(json.dumps(row))


def print_table(report: dict, path: Path) -> None:
    first = report["precisions"][0] if report["precisions"] else "fp32"
    n = report["config"]["eval_episodes"]
    print(f"\n| method | config | precision | updates/s | vs {first} | compile s "
          f"| eval env-steps/s ({n} at once) | one at a time | speed-up |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    marked = False
    for r in report["rows"]:
        if r.get("status") != "ok":
            print(f"| {r['method']} | {r['config']} | {r['precision']} | {r['status']}: "
                  f"{r.get('error', '')[:80]} | | | | | |")  # fmt: skip
            continue
        speed = f"{r['train_updates_per_s']:.2f}"
        if "train_speed_note" in r:
            speed, marked = f"({speed})*", True
        ratio = r.get("speedup_vs_" + first.replace(" ", ""))
        single, gain = r.get("eval_single_env_steps_per_s"), r.get("vectorized_speedup")
        comp = r.get("compile_time_s")
        cells = [r["method"], r["config"], r["precision"], speed,
                 "" if ratio is None else f"{ratio:.2f}x", "" if comp is None else f"{comp:.1f}",
                 f"{r['eval_env_steps_per_s']:.0f}", "" if single is None else f"{single:.0f}",
                 "" if gain is None else f"{gain:.1f}x"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    if marked:
        print("\n* compile time included (the method file does not report it apart): not a speed.")
    gpu, device = report.get("gpu"), report["device"]
    where = f" ({gpu})" if gpu else f" ({report['cpu']}, native bf16: {report['cpu_bf16_native']})"
    print(f"device {device}{where}; wrote {path}")


def main(args: Args) -> dict:
    import torch

    import common

    check(args)
    paths = dataset_paths(args.dataset, args.data_dir)
    base = ["--env", args.dataset, "--device", args.device]
    base += ["--dataset-path", *paths] if paths else []
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    variants = list(args.precisions) or default_precisions(cuda, native)
    device = "cuda" if cuda else "cpu"
    path = output_path(args, device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = f"cannot make the output folder ({e.strerror})"
        raise SystemExit(f"error: {path.parent}: {why}.") from None
    report = load_previous(path)
    # an earlier call's precisions first: each row's speed-up is over the first of them (fp32)
    earlier = report.get("precisions", [])
    report |= dict(config=asdict(args), device=device, cpu=cpu_model(),
                   precisions=earlier + [v for v in variants if v not in earlier],
                   gpu=torch.cuda.get_device_name(0) if cuda else None, cpu_bf16_native=native,
                   cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                   git_commit=git_commit())  # fmt: skip
    report.setdefault("rows", [])
    report.setdefault("wall_time_s", 0.0)
    measure_all(args, plan(args, variants), report, path, base)
    rows = report["rows"]
    derived(rows, report["precisions"][0])
    ok = [r for r in rows if r.get("status") == "ok"]
    # the loader's verdict on the data (replica, official D4RL, local file), as the runs recorded it
    report["dataset_source"] = common.SOURCE_LABEL[ok[0]["dataset_source"]] if ok else None
    if ok:
        report["device"] = ok[0]["device"]
    save(path, report)
    print_table(report, path)
    return report


if __name__ == "__main__":
    main(tyro.cli(Args))
