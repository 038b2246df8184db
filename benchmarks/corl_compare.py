"""dt.py against CORL's dt.py on this CPU (issue 28, item 5): training steps per second, measured
side by side in one process, at the DT paper's config (3 layers, 128 wide, 1 head, batch 64,
K = 20, hopper's 11 state and 3 action dimensions).

    python benchmarks/corl_compare.py --corl ~/CORL                      # a CORL checkout
    SEQRL_CORL=/tmp/corl_dt.py python benchmarks/corl_compare.py         # or its offline dt.py
    python benchmarks/corl_compare.py --corl ~/CORL --profile            # plus profiler tables
    python benchmarks/corl_compare.py --corl ~/CORL --ours /tmp/dt_a.py  # a dt.py variant beside

Ours: dt.py's full training step as dt.train() runs it (sample_batch from an in-memory dataset
made by dt.make_dataset, update, the scheduler's step). CORL's: its bare model step as its train()
runs it (forward, masked MSE, zero_grad, backward, clip_grad_norm_ at 0.25, AdamW, its warmup
scheduler), on batches drawn before the timing, without its DataLoader: generous to CORL. Nothing
of CORL is copied here: its DecisionTransformer is imported at run time from the file --corl
names. That file imports d4rl, gym and pyrallis at the top; those not installed are stubbed
(recorded in the JSON) only while it is imported, and none of them is used by what is timed.

Timing: one thread, `--steps` updates per contestant per round, the contestants' order reversed
every round (A B, B A, ...) so that a slow-down during a round falls on both; warm-up rounds
are dropped. Per round, the ratio CORL time / our time (> 1: ours is faster), its median and
quartiles over rounds; wall time and this thread's CPU time (which other processes on a busy
machine disturb less). Writes one JSON under --out; never overwrites.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ENV_VAR = "SEQRL_CORL"
CORL_FILE = Path("algorithms") / "offline" / "dt.py"  # inside a CORL checkout
STUBBED = ("d4rl", "gym", "pyrallis", "wandb")  # CORL's top-level imports the model never uses
OBS_DIM, ACT_DIM = 11, 3  # hopper's
POOL = 16  # CORL's batches, drawn before the timing and cycled


@dataclass
class Args:
    """dt.py's training step against CORL's dt.py model step, side by side on this CPU."""

    corl: Optional[str] = None
    """a CORL checkout (github.com/corl-team/CORL) or its algorithms/offline/dt.py; default:
    $SEQRL_CORL"""
    ours: tuple[str, ...] = ()
    """more dt.py files (e.g. edited copies under /tmp) measured beside the repository's dt.py"""
    precisions: tuple[Literal["fp32", "bf16"], ...] = ()
    """precisions to measure; default fp32, and bf16 autocast where this CPU has it natively"""
    rounds: int = 15
    """measured rounds (each runs every contestant once)"""
    warmup_rounds: int = 2
    """rounds run first and dropped (allocator, caches, the optimizers' state)"""
    steps: int = 20
    """training steps per contestant per round"""
    n_layer: int = 3
    """transformer blocks (the DT paper's 3)"""
    n_head: int = 1
    """attention heads (1)"""
    n_embd: int = 128
    """embedding width (128)"""
    batch_size: int = 64
    """segments per update (64)"""
    context_len: int = 20
    """K, timesteps per segment (20)"""
    dropout: float = 0.1
    """every dropout of both models (0.1, both files' default)"""
    threads: int = 1
    """torch CPU threads"""
    profile: bool = False
    """also profile `--profile-steps` fp32 steps of each with torch.profiler: self CPU time by op
    and the split into forward, backward, clip, zero_grad, optimizer and scheduler"""
    profile_steps: int = 20
    """steps profiled per contestant with --profile"""
    seed: int = 0
    """seed of the data, the models and the batch sampling"""
    out: str = str(ROOT / "benchmarks" / "results" / "corl")
    """folder of the JSON (corl_compare__{time}.json)"""


@dataclass
class Contestant:
    """One training step, ready to run again and again, and what it trains (for the profiler)."""

    name: str
    precision: str
    step: Callable[[], None]
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    module: object
    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)


# --- Finding and importing CORL's file, and our dt.py files.
def corl_path(given: Optional[str]) -> Path:
    """The CORL dt.py that --corl (or $SEQRL_CORL) names; anything else is one line saying how."""
    flag = "--corl" if given else f"${ENV_VAR}"
    given = given or os.environ.get(ENV_VAR)
    how = (
        f"pass a CORL checkout (git clone https://github.com/corl-team/CORL) or its {CORL_FILE}, "
        f"with --corl PATH or ${ENV_VAR}"
    )
    if not given:
        raise SystemExit(f"error: --corl not given and ${ENV_VAR} unset: {how}.")
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / CORL_FILE
    if not path.is_file():
        raise SystemExit(f"error: {flag} {given}: no such file ({path}); {how}.")
    return path


def import_file(path: Path, name: str):
    """A Python file imported as module `name` (registered under it: dataclasses look their module
    up), apart from the entry of the name it would usually have."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def stub(name: str) -> types.ModuleType:
    """A stand-in module: any attribute is a new empty class (CORL's signatures name gym.Env), and
    pyrallis.wrap() is a decorator that changes nothing."""
    mod = types.ModuleType(name)

    def missing(attr: str):  # PEP 562: called only for attributes the module lacks
        if attr.startswith("__"):  # __file__, __path__: what importers probe must stay absent
            raise AttributeError(attr)
        return type(attr, (), {})

    mod.__getattr__ = missing
    mod.wrap = lambda *a, **k: lambda fn: fn
    return mod


def import_corl(path: Path) -> tuple[object, list[str]]:
    """CORL's dt.py, with the top-level imports it needs only for training runs stubbed where they
    are not installed. The stubs leave sys.modules afterwards. Returns the module and what was
    stubbed."""
    missing = [m for m in STUBBED if importlib.util.find_spec(m) is None]
    saved = {m: sys.modules.get(m) for m in missing}
    sys.modules.update({m: stub(m) for m in missing})
    try:
        mod = import_file(path, "corl_dt")
    except Exception as e:
        why = f"importing it failed ({type(e).__name__}: {e})"
        raise SystemExit(f"error: --corl {path}: {why}; pass CORL's {CORL_FILE}.") from None
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old
    if not isinstance(getattr(mod, "DecisionTransformer", None), type):
        why = "defines no DecisionTransformer class; pass CORL's algorithms/offline/dt.py"
        raise SystemExit(f"error: --corl {path}: {why}.")
    return mod, missing


def import_ours(paths: tuple[str, ...]) -> dict:
    """The repository's dt.py as `dt`, and each --ours file under its own name (its stem)."""
    mods = {"dt": import_file(ROOT / "dt.py", "seqrl_dt")}
    for i, p in enumerate(paths):
        if not Path(p).is_file():
            raise SystemExit(f"error: --ours {p}: no such file; pass an edited copy of dt.py.")
        name = Path(p).stem if Path(p).stem not in mods else f"{Path(p).stem}_{i}"
        mods[name] = import_file(Path(p), f"seqrl_variant_{i}")
    return mods


# --- The contestants.
def fake_episodes(seed: int, n: int = 40) -> list[dict]:
    """Hopper-sized episodes of 20-1000 steps with random contents, as common.load_dataset returns
    them: the timing needs shapes and padding, not real data."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 1001, n)
    return [
        dict(observations=rng.normal(size=(n_, OBS_DIM)).astype(np.float32),
             actions=rng.uniform(-1, 1, (n_, ACT_DIM)).astype(np.float32),
             rewards=rng.uniform(0, 3, n_).astype(np.float32))
        for n_ in lengths
    ]  # fmt: skip


def autocast_for(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def ours(name: str, mod, args: Args, episodes: list, precision: str) -> Contestant:
    """dt.train()'s step: sample_batch, update, the scheduler's step, at the flags' config."""
    cfg = {
        k: getattr(args, k) for k in "n_layer n_head n_embd batch_size context_len dropout".split()
    }
    a = mod.Args(**cfg, seed=args.seed)
    arch = {k: getattr(a, k) for k in mod.ARCH} | {"state_dim": OBS_DIM, "act_dim": ACT_DIM}
    torch.manual_seed(args.seed)
    model = mod.DecisionTransformer(**arch).train()
    data = mod.make_dataset(episodes, torch.device("cpu"), a.rtg_scale, a.max_ep_len)
    opt, sched = mod.make_optimizer(model, a)
    gen, autocast = torch.Generator().manual_seed(args.seed), autocast_for(precision)

    def step():
        batch = mod.sample_batch(data, a.batch_size, a.context_len, gen)
        mod.update(model, opt, batch, a.grad_clip, autocast)
        sched.step()

    return Contestant(name, precision, step, model, opt, sched, mod)


def corl_batches(mod, args: Args, episodes: list) -> list[tuple]:
    """POOL batches in CORL's layout (states, actions, returns (B, K), time steps, mask): our
    sampler's segments with the padding moved to the right end, as CORL pads (its padded queries
    then still see real keys; left padding would give them none, and NaNs). The mask is float64,
    as CORL's numpy-built mask reaches its loop."""
    data = mod.make_dataset(episodes, torch.device("cpu"), 1000.0, 1000)
    gen, K = torch.Generator().manual_seed(args.seed + 1), args.context_len
    out = []
    for _ in range(POOL):
        b = mod.sample_batch(data, args.batch_size, K, gen)
        pad = (~b["mask"]).sum(1, keepdim=True)
        idx = (torch.arange(K) + pad) % K  # left-padded row -> right-padded row
        take = {k: v.gather(1, idx.view(*idx.shape, *[1] * (v.dim() - 2)).expand_as(v))
                for k, v in b.items()}  # fmt: skip
        out.append((take["states"], take["actions"], take["rtg"][..., 0], take["timesteps"],
                    take["mask"].double()))  # fmt: skip
    return out


def corl(mod, args: Args, batches: list, precision: str) -> Contestant:
    """CORL's train() loop body without its DataLoader and W&B log: forward, masked MSE, zero_grad,
    backward, clip at 0.25, AdamW (its defaults: lr 1e-4, decay 1e-4 on every tensor), its warmup
    scheduler. Under bf16 the forward runs in autocast and the loss in fp32, as ours."""
    torch.manual_seed(args.seed)
    p = args.dropout
    model = mod.DecisionTransformer(
        state_dim=OBS_DIM, action_dim=ACT_DIM, seq_len=args.context_len, episode_len=1000,
        embedding_dim=args.n_embd, num_layers=args.n_layer, num_heads=args.n_head,
        attention_dropout=p, residual_dropout=p, embedding_dropout=p, max_action=1.0,
    ).train()  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda steps: min((steps + 1) / 10_000, 1))
    pool, autocast = itertools.cycle(batches), autocast_for(precision)

    def step():
        states, actions, returns, time_steps, mask = next(pool)
        padding_mask = ~mask.to(torch.bool)
        with autocast:
            pred = model(states=states, actions=actions, returns_to_go=returns,
                         time_steps=time_steps, padding_mask=padding_mask)  # fmt: skip
        loss = F.mse_loss(pred.float(), actions.detach(), reduction="none")
        loss = (loss * mask.unsqueeze(-1)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        sched.step()

    return Contestant("corl", precision, step, model, opt, sched, mod)


# --- Timing.
def run_rounds(contestants: list[Contestant], args: Args) -> None:
    """--warmup-rounds + --rounds rounds; each contestant runs --steps steps per round, the order
    reversed every round. Per-step wall and thread CPU seconds of the measured rounds go into each
    contestant's lists."""
    for r in range(args.warmup_rounds + args.rounds):
        for c in contestants if r % 2 == 0 else contestants[::-1]:
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(args.steps):
                c.step()
            wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
            if r >= args.warmup_rounds:
                c.wall.append(wall / args.steps)
                c.cpu.append(cpu / args.steps)


def spread(xs: list[float]) -> dict:
    """Median, quartiles, min and max."""
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return dict(median=med, q1=q1, q3=q3, min=min(xs), max=max(xs))


def summary(contestants: list[Contestant]) -> list[dict]:
    """Per contestant: ms per step and, against CORL at the same precision, the per-round ratio CORL
    time / its time (> 1: faster than CORL), on both clocks."""
    base = {c.precision: c for c in contestants if c.name == "corl"}
    rows = []
    for c in contestants:
        row = dict(name=c.name, precision=c.precision)
        for clock in ("wall", "cpu"):
            mine = getattr(c, clock)
            row[f"{clock}_ms"] = spread([1e3 * x for x in mine])
            if c.name != "corl" and c.precision in base:
                theirs = getattr(base[c.precision], clock)
                row[f"{clock}_ratio_vs_corl"] = spread([t / m for t, m in zip(theirs, mine)])
        rows.append(row)
    return rows


# --- Profiling: self CPU time by op, and the split into the step's phases (ops.py's marks).
def profile_split(c: Contestant, steps: int) -> dict:
    """torch.profiler over `steps` steps; every event's self CPU time goes to the innermost phase
    range around it (a range's own self time is the Python between ops). Per step, in ms."""
    import ops
    from torch.profiler import ProfilerActivity, profile, record_function

    h = types.SimpleNamespace(opt=c.opt, module=c.module)
    marks = ops.phase_marks(h) + [(c.sched, "step", ops.marked(c.sched.step, "scheduler"))]
    with ops.patched(marks):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function(ops.TAG + "forward"):  # what no inner mark claims
                    c.step()
    phase_us, op_us, phase_op_us = Counter(), Counter(), {}
    for evt in prof.events():
        is_mark = evt.name.startswith(ops.TAG)
        mark = evt if is_mark else ops.enclosing(evt, lambda p: p.name.startswith(ops.TAG))
        phase = mark.name[len(ops.TAG) :] if mark is not None else "outside"
        name = "(python between ops)" if is_mark else evt.name
        phase_us[phase] += evt.self_cpu_time_total
        op_us[name] += evt.self_cpu_time_total
        phase_op_us.setdefault(phase, Counter())[name] += evt.self_cpu_time_total
    ms = lambda us: round(us / 1e3 / steps, 4)  # noqa: E731
    return dict(
        name=c.name, precision=c.precision, steps=steps,
        total_ms_per_step=ms(sum(phase_us.values())),
        phase_ms_per_step={p: ms(v) for p, v in phase_us.most_common()},
        top_self_cpu_ms_per_step=[(n, ms(v)) for n, v in op_us.most_common(25)],
        top_by_phase={p: [(n, ms(v)) for n, v in cnt.most_common(8)]
                      for p, cnt in phase_op_us.items()},
    )  # fmt: skip


def op_cpu_times(c: Contestant, steps: int) -> list:
    """Thread CPU time of every aten op over `steps` steps (a TorchDispatchMode times each call),
    top 25, in ms per step. Unlike the profiler's wall-clock times, other processes on a busy
    machine hardly move these; the mode's own cost per call is left out of each op's time."""
    from torch.utils._python_dispatch import TorchDispatchMode

    spent = Counter()

    class Timer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.thread_time_ns()
            out = func(*args, **(kwargs or {}))
            spent[str(func.overloadpacket)] += time.thread_time_ns() - t0
            return out

    with Timer():  # the autograd engine runs a CPU backward on this thread, inside the mode
        for _ in range(steps):
            c.step()
    return [(name, round(ns / 1e6 / steps, 4)) for name, ns in spent.most_common(25)]


# --- Report.
def facts() -> dict:
    """Where it ran: CPU, torch, load, commit and whether dt.py differs from it."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln
        )
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout  # noqa: E731
    return dict(
        cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
        bf16_native=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        git_commit=git("rev-parse", "HEAD").strip() or None,  # dt.py's: ours[...]["sha256"]
        dt_py_uncommitted=bool(git("status", "--porcelain", "--", "dt.py").strip()),
    )  # fmt: skip


def load() -> dict:
    """The 1/5/15-minute load averages and `uptime`'s line: how busy the machine was."""
    try:
        line = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # no uptime on this machine: the load averages say it all the same
        line = None
    return dict(loadavg=os.getloadavg(), uptime=line)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def diff_to_dt(path: Path) -> str:
    """A variant's unified diff against the repository's dt.py (empty for dt.py itself), so that
    the JSON says what was measured after the variant file is gone."""
    theirs = (ROOT / "dt.py").read_text().splitlines(keepends=True)
    mine = path.read_text().splitlines(keepends=True)
    return "".join(difflib.unified_diff(theirs, mine, "dt.py", str(path)))


def file_facts(path: Path) -> dict:
    return dict(path=str(path.resolve()), sha256=sha256(path), diff_to_dt_py=diff_to_dt(path))


def corl_commit(path: Path) -> Optional[str]:
    """The commit of a CORL checkout the file sits in, if it is one."""
    git = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=path.parent, capture_output=True, text=True
    )
    return git.stdout.strip() if git.returncode == 0 else None


def print_table(rows: list[dict]) -> None:
    print(f"{'contestant':<22}{'precision':<10}{'wall ms':>9}{'cpu ms':>9}"
          f"{'x CORL (wall)':>22}{'x CORL (cpu)':>22}")  # fmt: skip
    for r in rows:
        cells = [f"{r['name']:<22}{r['precision']:<10}"]
        cells += [f"{r[k]['median']:>9.2f}" for k in ("wall_ms", "cpu_ms")]
        for k in ("wall_ratio_vs_corl", "cpu_ratio_vs_corl"):
            s = r.get(k)
            cells.append(
                f"{s['median']:>10.3f} [{s['q1']:.2f}-{s['q3']:.2f}]" if s else f"{'':>22}"
            )
        print("".join(cells))


def check(args: Args) -> None:
    for (
        name
    ) in "rounds steps n_layer n_head n_embd batch_size context_len threads profile_steps".split():
        if getattr(args, name) < 1:
            raise SystemExit(
                f"error: --{name.replace('_', '-')} {getattr(args, name)}: must be >= 1."
            )
    if args.warmup_rounds < 0:
        raise SystemExit(f"error: --warmup-rounds {args.warmup_rounds}: must be >= 0.")
    if args.n_embd % args.n_head:
        raise SystemExit(
            f"error: --n-embd {args.n_embd} must be divisible by --n-head {args.n_head}."
        )
    if not 0 <= args.dropout < 1:
        raise SystemExit(f"error: --dropout {args.dropout}: must be in [0, 1).")


def main(args: Args) -> dict:
    check(args)
    path = corl_path(args.corl)
    corl_mod, stubbed = import_corl(path)
    mods = import_ours(args.ours)
    # read now, as imported: dt.py may be edited (and committed) while the rounds run
    files = dict(ours={n: file_facts(Path(m.__file__)) for n, m in mods.items()}, **facts())
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    precisions = list(args.precisions) or (["fp32", "bf16"] if native else ["fp32"])
    out = Path(args.out) / f"corl_compare__{int(time.time())}.json"
    if out.exists():
        raise SystemExit(f"error: {out} exists; wait a second or pass another --out.")
    try:  # before minutes of timing, not after
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {args.out}: cannot make it ({e.strerror}).") from None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return measure_and_write(args, path, corl_mod, stubbed, mods, files, precisions, out)
    finally:
        torch.set_num_threads(threads)  # as it was (a caller such as the tests goes on)


def measure_and_write(args, path, corl_mod, stubbed, mods, files, precisions, out) -> dict:
    """Builds the contestants, times them, profiles them with --profile, and writes the JSON."""
    t0, load_before = time.time(), load()
    episodes = fake_episodes(args.seed)
    batches = corl_batches(mods["dt"], args, episodes)
    contestants = []
    for prec in precisions:
        contestants += [ours(n, m, args, episodes, prec) for n, m in mods.items()]
        contestants.append(corl(corl_mod, args, batches, prec))
    run_rounds(contestants, args)
    rows = summary(contestants)
    print_table(rows)
    profiles = []
    for c in [c for c in contestants if args.profile and c.precision == "fp32"]:
        cpu_ops = op_cpu_times(c, args.profile_steps)
        profiles.append(profile_split(c, args.profile_steps) | dict(op_cpu_ms_per_step=cpu_ops))
    report = dict(
        args=asdict(args), threads=torch.get_num_threads(), precisions=precisions,
        corl=dict(path=str(path), sha256=sha256(path), commit=corl_commit(path), stubbed=stubbed),
        **files,
        load_before=load_before, load_after=load(), wall_time_s=round(time.time() - t0, 1),
        rows=rows, per_round={f"{c.name}/{c.precision}": dict(wall_s=c.wall, cpu_s=c.cpu)
                              for c in contestants},
        profiles=profiles,
    )  # fmt: skip
    try:
        out.write_text(json.dumps(report, indent=1))
    except OSError as e:
        raise SystemExit(f"error: --out {args.out}: cannot write there ({e.strerror}).") from None
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
