"""Aten ops per training update of every method file (issue 28, item 1), counted with torch.profiler
on the CPU and split into the update's phases: forward (with the loss), backward, clip
(clip_grad_norm_), zero_grad and optimizer.step; batch sampling is counted apart. On a GPU an op is
about one kernel launch (5-10 us), so at Table 1.1 size this count, not the arithmetic, bounds the
speed of an update.

    python benchmarks/ops.py                       # every file, default config: minutes on 2 cores
    python benchmarks/ops.py --methods dt mo_dt --config tiny                   # seconds
    python benchmarks/ops.py --commit HEAD --out benchmarks/results/ops   # the committed table

Counted: top-level aten ops, i.e. ops whose profiler parent chain holds no other aten op
(aten::linear counts once, not with the addmm inside it). Each file runs at its Args() defaults
(fp32; `--config tiny` shrinks them) on random data of the right shapes (hopper's 11 state and 3
action dimensions; BabyAI grids for iem), so no dataset file is needed. Two warm-up updates come
first (the optimizers make their state then); then one update is counted twice: with the kernels
torch picks on a CPU (its optimizers loop over the tensors there) and with those it picks on CUDA
(one foreach kernel per step of the optimizer's math, where the optimizer leaves the choice to
torch; the DT family's F.dropout and SDPA's fused attention, where on a CPU it draws its own
dropout masks and writes the attention out). The second is what a GPU would launch. Of each
count, the ops that launch work are estimated too (views, metadata and host-side ops launch
nothing).
Writes ops.json and ops.md to --out (default: a new folder under runs/); never overwrites without
--force.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import tyro
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

METHODS = ("dt", "mo_dt", "trdt", "rgdt", "tt", "iem", "bc")
PHASES = ("forward", "backward", "clip", "zero_grad", "optimizer")  # one update: they add up
TAG = "ops::"  # the profiler ranges this script opens around each phase
# Ops that make a view, read metadata or work on the host (the optimizers' step counters live on the
# CPU): no kernel on a GPU. The second set launches nothing unless one of its aten children does (a
# `to` to the same dtype and device, a `reshape` of a contiguous tensor).
VIEWS = set(
    "view t transpose permute unsqueeze squeeze expand as_strided slice select unbind detach alias "
    "_unsafe_view item _local_scalar_dense lift_fresh empty empty_like empty_strided".split()
)
MAYBE_VIEWS = set("to reshape contiguous flatten unflatten type_as view_as expand_as".split())
MAYBE_VIEWS |= {"split", "chunk"}
OBS_DIM, ACT_DIM = 11, 3  # hopper's
DT_MODELS = {"dt": "DecisionTransformer", "mo_dt": "MultiObjectiveDecisionTransformer",
             "trdt": "TrustRegionDecisionTransformer"}  # fmt: skip
TINY_DT = dict(n_layer=1, n_head=1, n_embd=16, batch_size=4, context_len=5)
# fmt: skip
TINY = {  # --config tiny: each file's Args with these replaced (only the fields the file has)
    "dt": TINY_DT,
    "mo_dt": TINY_DT,
    "trdt": TINY_DT,
    "rgdt": dict(
        n_enc_layer=1,
        n_layer=1,
        n_head=1,
        n_embd=16,
        batch_size=4,
        return_len=5,
        state_len=3,
        inv_hidden=16,
        inv_batch_size=8,
    ),
    "tt": dict(n_layer=1, n_head=1, n_embd=16, batch_size=4, n_bins=10, seq_len=3, max_context=2),
    "iem": dict(n_layer=1, n_head=1, n_embd=16, batch_size=4),
    "bc": dict(hidden=(16, 16), batch_size=8),
}


@dataclass
class Args:
    """Aten ops per training update of each method file, per phase (forward, backward, clip,
    optimizer.step), on the CPU with torch.profiler; JSON and a markdown table out."""

    methods: tuple[str, ...] = METHODS
    """method files to count (rgdt gives two rows: its translator's and inverse dynamics')"""
    config: Literal["default", "tiny"] = "default"
    """`default`: each file's Args() defaults (Table 1.1 size for mo_dt and trdt); `tiny`: one
    narrow layer, seconds (what CI runs)"""
    out: Optional[str] = None
    """folder for ops.json and ops.md (default: a new folder runs/ops__{config}__{time})"""
    force: bool = False
    """overwrite ops.json and ops.md in --out if they exist"""
    warmup: int = 2
    """updates run before the counted one (the optimizers make their state in the first)"""
    commit: Optional[str] = None
    """count the method files of this git commit (e.g. `HEAD`, read with `git archive` into a
    temporary folder) instead of the working tree's, which others may be editing"""


@dataclass
class Harness:
    """One update of a method file, ready to run again and again, and what it trains."""

    step: Callable[[], None]
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    module: object  # the method file, whose sampling functions get marked
    flags: dict  # the Args fields that differ from the file's defaults
    note: str = ""


# --- Data: random episodes of the right shapes, no dataset file.
def fake_episodes(n: int = 8, length: int = 60, seed: int = 0) -> list[dict]:
    """Episodes as common.load_dataset returns them (hopper-sized), with random contents."""
    rng = np.random.default_rng(seed)
    # fmt: skip
    return [
        dict(
            observations=rng.normal(size=(length, OBS_DIM)).astype(np.float32),
            actions=rng.uniform(-1, 1, (length, ACT_DIM)).astype(np.float32),
            rewards=rng.uniform(0, 3, length).astype(np.float32),
            terminated=bool(i % 2),
        )
        for i in range(n)
    ]


def fake_demos(iem, level: str, n: int = 8, length: int = 12, seed: int = 0) -> dict:
    """BabyAI demos as iem.load_demos returns them: fully observed grids with one agent each,
    actions, episode lengths and missions."""
    rng = np.random.default_rng(seed)
    W, H, _ = iem.make_env(level).observation_space["image"].shape
    N = n * length
    codes = [rng.integers(0, k, (N, W, H)) for k in (11, 6, 3)]  # object, colour, state
    images = np.stack(codes, -1).astype(np.uint8)
    images[images[..., 0] == iem.AGENT, 0] = 1  # exactly one agent per grid, facing a random way
    ax, ay = rng.integers(0, W, N), rng.integers(0, H, N)
    agent = [np.full(N, iem.AGENT), rng.integers(0, 6, N), rng.integers(0, 4, N)]
    images[np.arange(N), ax, ay] = np.stack(agent, 1)
    actions = rng.integers(0, iem.N_ACTIONS, N)
    missions = np.array(["go to the red ball", "go to a box", "go to the key"] * n)[:n]
    return dict(images=images, actions=actions, lengths=np.full(n, length), missions=missions)


# --- The method files' updates, each built at its default (or tiny) config.
def call(fn, **pool):
    """fn with the arguments its signature names, taken by name from pool: the method files'
    functions take different arguments. One it needs that pool lacks is a clear error, not a wrong
    count."""
    kwargs = {}
    for name, p in inspect.signature(fn).parameters.items():
        needed = p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        if name in pool:
            kwargs[name] = pool[name]
        elif needed:
            where = f"{fn.__module__}.{fn.__qualname__}"
            why = "which benchmarks/ops.py does not pass; teach ops.py the new argument"
            raise SystemExit(f"error: {where} takes `{name}`, {why}.")
    return fn(**kwargs)


def configured(mod, name: str, config: str):
    """The file's Args() defaults, shrunk by TINY under --config tiny, and the fields that
    differ."""
    args = mod.Args()
    if config == "tiny":
        names = {f.name for f in fields(args)}
        args = replace(args, **{k: v for k, v in TINY[name].items() if k in names})
    defaults = asdict(mod.Args())
    return args, {k: v for k, v in asdict(args).items() if v != defaults[k]}


def optimizer_of(made):
    """make_optimizer returns (optimizer, scheduler) today; an optimizer alone is taken too."""
    return made[0] if isinstance(made, tuple) else made


def dt_family(name: str, config: str) -> Harness:
    """dt, mo_dt, trdt: sample_batch, then the file's own update() (forward, loss, backward, clip,
    step)."""
    mod = importlib.import_module(name)
    args, flags = configured(mod, name, config)
    arch = {k: getattr(args, k) for k in mod.ARCH} | {"state_dim": OBS_DIM, "act_dim": ACT_DIM}
    model = getattr(mod, DT_MODELS[name])(**arch)
    data = call(mod.make_dataset, episodes=fake_episodes(), device=torch.device("cpu"),
                rtg_scale=args.rtg_scale, max_ep_len=args.max_ep_len,
                bins=getattr(args, "bins", None), state_stats=None)  # fmt: skip
    opt = optimizer_of(mod.make_optimizer(model, args))
    gen = torch.Generator().manual_seed(0)
    lambdas = dict(zip(mod.TASKS, args.lambdas)) if hasattr(mod, "TASKS") else None
    pool = dict(model=model, opt=opt, grad_clip=args.grad_clip, lambdas=lambdas,
                schedule=getattr(args, "schedule", None),
                autocast=torch.autocast("cpu", dtype=torch.bfloat16, enabled=False))  # fmt: skip

    def step():
        batch = mod.sample_batch(data, args.batch_size, args.context_len, gen)
        call(mod.update, batch=batch, **pool)

    return Harness(step, model, opt, mod, flags)


def rgdt_setup(config: str):
    """rgdt's data, two models and two optimizers, as rgdt.train() makes them."""
    mod = importlib.import_module("rgdt")
    args, flags = configured(mod, "rgdt", config)
    arch = {k: getattr(args, k) for k in mod.ARCH + mod.INV_ARCH}
    arch |= {"state_dim": OBS_DIM, "act_dim": ACT_DIM}
    model, inv = mod.make_models(arch, torch.device("cpu"))
    data = call(mod.make_dataset, episodes=fake_episodes(), device=torch.device("cpu"),
                rtg_scale=args.rtg_scale)  # fmt: skip
    return mod, args, flags, data, model, inv


def rgdt_translator(config: str) -> Harness:
    """rgdt.py has no update function: this is one translator update exactly as rgdt.train()'s loop
    does it (sample_batch; forward under autocast; state_loss; zero_grad; backward; clip_grad_norm_;
    step)."""
    mod, args, flags, data, model, _ = rgdt_setup(config)
    opt = optimizer_of(mod.make_optimizer(model, args))
    gen, autocast = torch.Generator().manual_seed(0), torch.autocast("cpu", enabled=False)

    def step():
        b = mod.sample_batch(data, args.batch_size, model.return_len, model.state_len, gen)
        with autocast:
            mean, log_std = model(b["returns"], b["states"], b["mask"])
        full = args.full_context_loss
        loss = mod.state_loss(mean, log_std, b["next_states"], b["mask"], full)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()

    return Harness(step, model, opt, mod, flags)


def rgdt_inverse(config: str) -> Harness:
    """One inverse-dynamics update exactly as rgdt.train()'s first loop does it
    (sample_transitions, then inverse_dynamics_loss, which sampled its own steps before issue 29;
    zero_grad; backward; step; no clipping). The loop's get_total_norm runs only on logged steps,
    so it is left out."""
    mod, args, flags, data, _, inv = rgdt_setup(config)
    opt = call(mod.make_inv_optimizer, inv=inv, args=args, lr=args.inv_lr,
               weight_decay=args.inv_weight_decay)  # fmt: skip
    gen = torch.Generator().manual_seed(1)

    def step():
        if hasattr(mod, "sample_transitions"):
            batch = mod.sample_transitions(data, args.inv_batch_size, gen)
            loss = mod.inverse_dynamics_loss(inv, batch)
        else:
            loss = mod.inverse_dynamics_loss(inv, data, args.inv_batch_size, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    note = "no gradient clipping (rgdt.train's inverse loop has none)"
    return Harness(step, inv, opt, mod, flags, note=note)


def tt_update(config: str) -> Harness:
    """tt: sample_batch, then the file's update(). Before issue 29 update() sampled its own batch
    and took `args` whole (marked apart all the same); the flags' values are passed by name."""
    mod = importlib.import_module("tt")
    args, flags = configured(mod, "tt", config)
    values = asdict(args) | {"args": args, "device": torch.device("cpu")}
    data = call(mod.make_dataset, episodes=fake_episodes(), **values)
    model = mod.TrajectoryTransformer(OBS_DIM, ACT_DIM, args.n_bins, args.seq_len, args.n_layer,
                                      args.n_head, args.n_embd, args.dropout)  # fmt: skip
    per_epoch = len(data["starts"]) / args.batch_size
    schedule = dict(updates_per_epoch=per_epoch, warmup_updates=args.warmup_epochs * per_epoch,
                    decay_updates=args.decay_epochs * per_epoch)  # fmt: skip
    opt = optimizer_of(call(mod.make_optimizer, model=model, **schedule, **values))
    weights = call(mod.token_weights, model=model, T=model.block_size, **values)
    gen, autocast = torch.Generator().manual_seed(0), torch.autocast("cpu", enabled=False)
    pool = dict(
        model=model, opt=opt, data=data, weights=weights, gen=gen, autocast=autocast, **values
    )

    def step():
        if "batch" in inspect.signature(mod.update).parameters:
            pool["batch"] = mod.sample_batch(data, args.batch_size, args.seq_len, gen)
        call(mod.update, **pool)

    return Harness(step, model, opt, mod, flags)


def iem_optimizer(mod, model, args):
    """iem.train()'s optimizer, built inline there: AdamW (0.9, 0.95), decay 0.1 on weight matrices.
    The file's own make_optimizer is used once it has one."""
    if hasattr(mod, "make_optimizer"):
        made = call(mod.make_optimizer, model=model, args=args, lr=args.lr, updates=args.updates)
        return optimizer_of(made)
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def iem_update(config: str) -> Harness:
    """sample_batch, then iem.update(). Files from before iem.py had one inline it in train(): for
    them this is one update exactly as that loop does it (masked_loss under autocast; zero_grad;
    backward; clip_grad_norm_ at 1.0; step)."""
    mod = importlib.import_module("iem")
    args, flags = configured(mod, "iem", config)
    demos = fake_demos(mod, args.env)
    mission_len = max(len(str(m).split()) for m in demos["missions"])
    grid = list(demos["images"].shape[1:3])
    arch = {k: getattr(args, k) for k in mod.ARCH} | {"grid": grid, "mission_len": mission_len}
    data = mod.make_dataset(demos, mission_len, torch.device("cpu"))
    model = getattr(mod, "MaskedPlanModel", None) or mod.IEM  # named IEM before issue 29
    model = model(**arch)
    opt = iem_optimizer(mod, model, args)
    gen, autocast = torch.Generator().manual_seed(0), torch.autocast("cpu", enabled=False)
    pool = dict(model=model, opt=opt, all_masked=args.train_all_masked, autocast=autocast)

    def inline(batch):
        images, words, plan, valid = batch
        with autocast:
            loss = mod.masked_loss(model, images, words, plan, valid, args.train_all_masked)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def step():
        batch = mod.sample_batch(data, args.batch_size, arch["horizon"], gen)
        if hasattr(mod, "update"):
            call(mod.update, batch=batch, **pool)
        else:
            inline(batch)

    return Harness(step, model, opt, mod, flags)


def bc_update(config: str) -> Harness:
    """benchmarks/bc.py's update(); it draws its batch inline (randint and two gathers), so those
    three ops count in its forward. No gradient clipping."""
    mod = importlib.import_module("bc")
    args, flags = configured(mod, "bc", config)
    episodes = fake_episodes()
    keep = mod.keep_best(episodes, args.top_pct, args.select)
    data = mod.make_dataset(episodes, keep, args.normalize_states, torch.device("cpu"))
    hopper_box = [1.0] * ACT_DIM  # the action space's high end, as bc.train() reads it off the env
    policy = mod.MLPPolicy(OBS_DIM, ACT_DIM, tuple(args.hidden), hopper_box)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr, fused=True)  # as bc.train() makes it
    gen = torch.Generator().manual_seed(0)
    step = functools.partial(mod.update, policy, opt, data, args.batch_size, gen)
    note = "its batch draw (3 ops) counts in forward; no clipping"
    return Harness(step, policy, opt, mod, flags, note=note)


HARNESSES = {  # row name -> (method file, builder)
    "dt": ("dt", functools.partial(dt_family, "dt")),
    "mo_dt": ("mo_dt", functools.partial(dt_family, "mo_dt")),
    "trdt": ("trdt", functools.partial(dt_family, "trdt")),
    "rgdt (translator)": ("rgdt", rgdt_translator),
    "rgdt (inverse dynamics)": ("rgdt", rgdt_inverse),
    "tt": ("tt", tt_update),
    "iem": ("iem", iem_update),
    "bc": ("bc", bc_update),
}


# --- Counting: mark each phase with a profiler range, profile one update, tally the top-level ops.
def marked(fn, phase: str):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with record_function(TAG + phase):
            return fn(*a, **k)

    return wrapper


@contextlib.contextmanager
def patched(pairs: list[tuple[object, str, object]]):
    """Set each (object, attribute, value) for the duration, then put back exactly what was
    there."""
    saved = [(obj, name, name in vars(obj), getattr(obj, name)) for obj, name, _ in pairs]
    try:
        for obj, name, value in pairs:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, had, old in reversed(saved):
            setattr(obj, name, old) if had else delattr(obj, name)


def phase_marks(h: Harness) -> list[tuple[object, str, object]]:
    """Where each phase starts: backward, clip_grad_norm_ (and its parts), the optimizer's zero_grad
    and step, and the file's batch sampling, wherever the update calls them from."""
    utils, pairs = torch.nn.utils, []
    for obj, name, phase in [
        (torch.Tensor, "backward", "backward"),
        (torch.autograd, "backward", "backward"),
        (utils, "clip_grad_norm_", "clip"),
        (utils, "get_total_norm", "clip"),
        (utils, "clip_grads_with_norm_", "clip"),
        (h.opt, "zero_grad", "zero_grad"),
        (h.opt, "step", "optimizer"),
        (h.module, "sample_batch", "sample"),
        (h.module, "sample_steps", "sample"),
    ]:
        # fmt: skip
        if hasattr(obj, name):
            pairs.append((obj, name, marked(getattr(obj, name), phase)))
    return pairs


def cuda_defaults(module) -> list[tuple[object, str, object]]:
    """torch's kernel choice as on CUDA: foreach in the optimizers that leave the choice to torch
    (on a CPU they loop over the tensors; the foreach ops run on a CPU too). clip_grad_norm_ picks
    foreach on both already. The DT family's model as on CUDA: F.dropout and SDPA's fused kernel,
    where on a CPU it draws its own dropout masks (own_masks, dt.py)."""
    import torch.optim.optimizer as optimizer

    pairs = [(optimizer, "_get_foreach_kernels_supported_devices", lambda: ["cuda", "cpu"])]
    if hasattr(module, "own_masks"):
        pairs.append((module, "own_masks", lambda x: False))
    return pairs


def enclosing(evt, test) -> Optional[object]:
    """The nearest profiler ancestor of evt that passes test, or None."""
    p = evt.cpu_parent
    while p is not None and not test(p):
        p = p.cpu_parent
    return p


def launches(evt) -> bool:
    """Whether an aten op launches work on a GPU (an estimate: see VIEWS)."""
    name = evt.name[len("aten::") :]
    if name in VIEWS:
        return False
    if name in MAYBE_VIEWS:
        return any(launches(c) for c in evt.cpu_children if c.name.startswith("aten::"))
    return True


def tally(events) -> dict:
    """Top-level aten ops per phase (the innermost of this script's ranges around each op), how many
    of them launch work (estimate), their names and their CPU time under the profiler."""
    counts, launching, names, time_us = Counter(), Counter(), {}, Counter()
    for evt in events:
        is_aten = evt.name.startswith("aten::")
        if not is_aten or enclosing(evt, lambda p: p.name.startswith("aten::")):
            continue
        mark = enclosing(evt, lambda p: p.name.startswith(TAG))
        phase = mark.name[len(TAG) :] if mark is not None else "unmarked"
        counts[phase] += 1
        launching[phase] += launches(evt)
        names.setdefault(phase, Counter())[evt.name] += 1
        time_us[phase] += evt.cpu_time_total
    return dict(counts=counts, launching=launching, names=names, time_us=time_us)


def count_update(h: Harness, warmup: int, as_cuda: bool) -> dict:
    """Ops of one update after `warmup` others; what no inner range claims is the forward pass and
    the loss."""
    with patched(phase_marks(h) + (cuda_defaults(h.module) if as_cuda else [])):
        for _ in range(warmup):
            h.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function(TAG + "forward"):
                h.step()
    t = tally(prof.events())
    if t["counts"]["unmarked"]:
        lost = t["counts"]["unmarked"]
        raise SystemExit(f"error: {lost} aten ops fell outside every phase; fix ops.py's marks.")
    phases = {p: t["counts"][p] for p in PHASES}
    launching = {p: t["launching"][p] for p in PHASES}
    every = [p for p in (*PHASES, "sample") if p in t["names"]]
    return dict(phases=phases, total=sum(phases.values()), sample=t["counts"]["sample"],
                launching=launching, launching_total=sum(launching.values()),
                profiled_cpu_ms={p: round(t["time_us"][p] / 1e3, 3) for p in every},
                top_ops={p: t["names"][p].most_common(6) for p in every})  # fmt: skip


def measure(row: str, config: str, warmup: int) -> dict:
    """Both counts of one row (CPU's and CUDA's kernel choice), each of a freshly built, seeded
    update."""
    out = {}
    for key, as_cuda in (("cpu", False), ("cuda_defaults", True)):
        torch.manual_seed(0)
        h = HARNESSES[row][1](config)
        out[key] = count_update(h, warmup, as_cuda)
    params = list(h.model.parameters())
    return dict(method=row, file=HARNESSES[row][0], flags=h.flags, note=h.note,
                optimizer=type(h.opt).__name__, parameter_tensors=len(params),
                parameters=sum(p.numel() for p in params), **out)  # fmt: skip


# --- Report.
def cpu_model() -> str:
    """The processor's marketing name (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


GIT = functools.partial(subprocess.run, cwd=ROOT, capture_output=True, text=True, check=True)


def git_state() -> dict:
    """The commit, and which of the counted files differ from it (their edits are in the counts)."""
    files = [f"{m}.py" for m in METHODS if m != "bc"] + ["benchmarks/bc.py", "common.py"]
    try:
        head = GIT(["git", "rev-parse", "HEAD"]).stdout.strip()
        diff = GIT(["git", "status", "--porcelain", "--", *files]).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return dict(git_commit=None, uncommitted=None)
    return dict(git_commit=head, uncommitted=[line[3:] for line in diff])


@contextlib.contextmanager
def files_of(rev: Optional[str]):
    """Count the working tree's files (rev None), or those of commit `rev`: its Python files (top
    level and benchmarks/) extracted into a temporary folder that goes first on the import path, so
    that the counts are that commit's whatever the working tree holds. Yields the git facts."""
    if rev is None:
        yield git_state()
        return
    try:
        commit = GIT(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"]).stdout.strip()
        files = GIT(["git", "ls-tree", "--name-only", commit, "--", ".", "benchmarks/"]).stdout
        wanted = [f for f in files.split() if f.endswith(".py")]
        tar = subprocess.run(["git", "archive", commit, "--", *wanted], cwd=ROOT,
                             capture_output=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit(f"error: --commit {rev}: not a commit of this repository.") from None
    names = [Path(f).stem for f in wanted if Path(f).stem != __name__]
    saved_path = list(sys.path)
    saved_modules = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
        sys.path[:0] = [tmp, str(Path(tmp) / "benchmarks")]
        try:
            yield dict(git_commit=commit, uncommitted=[])
        finally:
            sys.path[:] = saved_path
            for n in names:
                sys.modules.pop(n, None)
            sys.modules.update(saved_modules)


def table(report: dict) -> str:
    """The markdown table: per row the phases as torch runs them on a CPU, then optimizer.step and
    the total with CUDA's kernel choice, and how many of the ops launch work."""
    edits = ", ".join(report["uncommitted"] or [])
    lines = [
        f"Top-level aten ops per training update, `--config {report['config']}`, fp32, torch "
        f"{report['torch']}, {report['cpu']}, commit {report['git_commit']}"
        + (f" with uncommitted edits to {edits}" if edits else "")
        + ". Made by `python benchmarks/ops.py`. *CUDA's choice*: with the foreach kernels that "
        "torch's optimizers pick on CUDA, and the DT family's F.dropout and fused attention (on a "
        "CPU it draws its own dropout masks, a longer forward). *launching*: the ops that are "
        "not views, metadata or host work (an estimate of kernel launches). Batch sampling is "
        "counted apart.",
        "",
        "| file | optimizer | param. tensors | forward | backward | clip | optimizer.step | total "
        "| launching | optimizer.step, CUDA's choice | total, CUDA's choice "
        "| launching, CUDA's choice | batch sampling | total + sampling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        c, g = r["cpu"], r["cuda_defaults"]
        ph = c["phases"]
        zero = f" (+{ph['zero_grad']} zero_grad)" if ph["zero_grad"] else ""
        cells = [r["method"], r["optimizer"], r["parameter_tensors"], ph["forward"], ph["backward"],
                 ph["clip"], f"{ph['optimizer']}{zero}", c["total"], c["launching_total"],
                 g["phases"]["optimizer"], g["total"], g["launching_total"], c["sample"],
                 c["total"] + c["sample"]]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    notes = [f"- {r['method']}: {r['note']}" for r in report["rows"] if r["note"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write(out: Path, report: dict) -> list[Path]:
    paths = [out / "ops.json", out / "ops.md"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(json.dumps(report, indent=1))
        paths[1].write_text(table(report))
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot write there ({e.strerror}).") from None
    return paths


def main(args: Args) -> dict:
    if not args.methods or any(m not in METHODS for m in args.methods):
        given, known = " ".join(args.methods), " ".join(METHODS)
        raise SystemExit(f"error: --methods {given}: choose from {known}.")
    if args.warmup < 1:
        why = "must be at least 1 (the optimizers make their state in the first update)"
        raise SystemExit(f"error: --warmup {args.warmup}: {why}.")
    out = Path(args.out) if args.out else ROOT / "runs" / f"ops__{args.config}__{int(time.time())}"
    if not args.force and any((out / f).exists() for f in ("ops.json", "ops.md")):
        why = "ops.json or ops.md exists there; pass --force to overwrite it, or another --out"
        raise SystemExit(f"error: --out {out}: {why}.")
    torch.set_num_threads(1)  # counts do not depend on it; the profiler's times are one core's
    t0, rows = time.time(), []
    with files_of(args.commit) as code:
        for row in [r for r in HARNESSES if HARNESSES[r][0] in args.methods]:
            rows.append(measure(row, args.config, args.warmup))
            print(f"{row}: {rows[-1]['cpu']['total']} ops, {rows[-1]['cpu']['phases']}", flush=True)
    report = dict(config=args.config, args=asdict(args), **code, torch=torch.__version__,
                  cpu=cpu_model(), python=platform.python_version(), threads=1,
                  wall_time_s=time.time() - t0, precision="fp32",
                  counted="top-level aten ops (no aten ancestor) of one update after --warmup",
                  rows=rows)  # fmt: skip
    paths = write(out, report)
    print(table(report) + f"wrote {paths[0]} and {paths[1]}")
    return report


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
