"""Behaviour cloning baselines on the same data as the method files: BC and X%BC, the BC and 10% BC
columns of Table 1.3 and the 10% BC column of Table 2.1.

    python benchmarks/bc.py --env hopper-medium --dataset-path REPLICA/hopper-medium.hdf5
    python benchmarks/bc.py --env hopper-medium-replay --top-pct 10 --exp-name bc-10   # 10% BC
    python benchmarks/run.py --preset cpu --methods bc bc-10 --data-dir REPLICA  # beside the others
    python benchmarks/bc.py --resume runs/RUN                                    # continue a run

REPLICA: a folder of hdf5 files, e.g. the replica datasets (README).

BC regresses the dataset's action on the state (mean squared error) with an MLP; X%BC first keeps
only the best X% of the trajectories by return (CORL's any_percent_bc: 256x256 ReLU MLP, tanh
output, Adam 3e-4, batch 256, 10^6 updates, states normalised with the kept data's mean and std).
The thesis does not train these itself: its BC numbers are the IQL paper's [65], its 10% BC numbers
the DT paper's [7]. The DT paper's %BC keeps the top X% of *timesteps* (whole trajectories, best
first, up to X% of the steps), CORL's the top X% of *trajectories*; `--select` picks either.

Reuses the method files' plumbing (seeds and device, run folder, metrics lines, vector-env
evaluation, signals, atomic checkpoints, exact resume) from dt.py and the dataset facts from
common.py, and writes the same run folder: config.json, metrics.jsonl, results.json, model.pt. A run
stopped by Ctrl-C, SIGTERM or SIGUSR1 saves and prints the command that continues it (`--resume
RUN_DIR`); the continued run equals the one never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
from claims import THESIS  # noqa: E402
from dt import (  # noqa: E402
    catch_stop_signals,
    check_flags,
    git_commit,
    log_metrics,
    make_eval_envs,
    make_run_dir,
    record_config,
    restore_signals,
    restore_training_state,
    save_atomic,
    save_due,
    setup,
    signals_deferred,
    training_state,
    trim_metrics,
)

METHOD = "bc"
SCRIPT = "benchmarks/bc.py"  # as a user types it from the repository root


@dataclass
class Args:
    env: str = "hopper-medium-replay"
    """dataset: a D4RL gym-mujoco name such as `hopper-medium-replay` (with or without `-v2`), or a
    Minari id such as `mujoco/hopper/medium-v0`"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official
    file; several are concatenated (medium + expert = medium-expert)"""
    exp_name: str = METHOD
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}` (benchmarks/run.py:
    `bc`, `bc-10`)"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    top_pct: float = 100.0
    """X of X%BC: train on the best X% of the data by trajectory return; 100 is plain BC, 10 the
    thesis's 10% BC"""
    select: Literal["trajectories", "timesteps"] = "trajectories"
    """what X% counts: `trajectories` (CORL's any_percent_bc: the best X% of the trajectories) or
    `timesteps` (the DT paper's %BC, the source of the thesis's 10% BC numbers: the best
    trajectories until they hold X% of the steps)"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of the MLP policy (CORL's: 256 256)"""
    lr: float = 3e-4
    """Adam learning rate (CORL's; constant, no weight decay)"""
    batch_size: int = 256
    """transitions per update, drawn uniformly with replacement"""
    updates: int = 1_000_000
    """gradient updates (CORL's default 10^6)"""
    normalize_states: bool = True
    """standardise states with the kept data's mean and std (CORL's default);
    `--no-normalize-states` feeds them raw"""
    eval_episodes: int = 10
    """episodes per evaluation, all run at once in a vector env"""
    eval_every: int = 5000
    """evaluate before training and every N updates (0: only at the end)"""
    eval_async: bool = False
    """step the evaluation envs in subprocesses (gymnasium AsyncVectorEnv); pays off with many CPU
    cores"""
    resume: Optional[str] = None
    """a run folder (runs/RUN) that stopped before its end: continue it there, with its own flags,
    optimizer and random states, to its --updates; the result is the run it would have been without
    the stop"""
    save_every: int = 0
    """write the resumable checkpoint model.pt every N updates (0: at every evaluation and every 10%
    of the run); also at the end and on Ctrl-C, SIGTERM or SIGUSR1"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_every: int = 1000
    """log the training loss every N updates"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1)"""

    def __post_init__(self):
        check_flags(
            self,
            "lr batch_size updates eval_episodes log_every",
            "seed eval_every threads save_every",
        )
        if not 0 < self.top_pct <= 100:  # NaN fails this test too
            raise SystemExit(
                f"error: --top-pct {self.top_pct}: must be in (0, 100]; 100 is plain BC, 10 is 10% "
                "BC."
            )
        if not all(h > 0 for h in self.hidden):
            raise SystemExit(
                f"error: --hidden {' '.join(map(str, self.hidden))}: every width must be > 0."
            )


# Flags that say where and how a run runs, not what it computes: --resume takes them from its own
# command line.
RUN_FLAGS = "resume device threads eval_async runs_dir".split()


# --------------------------------------------------------------------------------------------------
# Data: the kept trajectories as two flat tensors on the training device; a batch is an index
# gather.
# --------------------------------------------------------------------------------------------------


def keep_best(episodes: list[dict], top_pct: float, select: str) -> np.ndarray:
    """Indices of the episodes X%BC trains on, best undiscounted return first. `trajectories`: the
    best max(1, floor(X% of the episodes)), as CORL; `timesteps`: the best ones while their steps
    stay within X% of all steps (at least the best one), as the DT paper."""
    returns = np.array([float(ep["rewards"].sum()) for ep in episodes])
    # ties: the earlier episode first, so the choice is reproducible
    order = np.argsort(-returns, kind="stable")
    if select == "trajectories":
        return order[: max(1, int(top_pct / 100 * len(episodes)))]
    lengths = np.array([len(ep["rewards"]) for ep in episodes])[order]
    budget = int(top_pct / 100 * lengths.sum())
    return order[: max(1, int(np.searchsorted(np.cumsum(lengths), budget, side="right")))]


def make_dataset(episodes: list[dict], keep: np.ndarray, normalize: bool, device) -> dict:
    """States and actions of the kept episodes; the state scale (CORL's: mean and std + 1e-3 of the
    kept states, or 0 and 1) is the one evaluation uses."""
    obs = np.concatenate([episodes[i]["observations"] for i in keep])
    act = np.concatenate([episodes[i]["actions"] for i in keep])
    mean, std = (
        (obs.mean(0), obs.std(0) + 1e-3)
        if normalize
        else (np.zeros(obs.shape[1]), np.ones(obs.shape[1]))
    )
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return {
        "states": torch.as_tensor((obs - mean) / std, dtype=torch.float32, device=device),
        "actions": torch.as_tensor(act, dtype=torch.float32, device=device),
        "state_stats": (mean, std),
    }


# --------------------------------------------------------------------------------------------------
# Model: CORL's BC actor, a ReLU MLP whose tanh output is scaled to the action box.
# --------------------------------------------------------------------------------------------------


class MLPPolicy(nn.Module):
    def __init__(
        self, state_dim: int, act_dim: int, hidden: tuple[int, ...], max_action: list[float]
    ):
        super().__init__()
        widths, layers = (state_dim, *hidden), []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], act_dim), nn.Tanh())
        self.register_buffer("max_action", torch.as_tensor(max_action, dtype=torch.float32))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.max_action * self.net(states)


def update(
    policy: MLPPolicy, opt, data: dict, batch_size: int, gen: torch.Generator
) -> torch.Tensor:
    """One Adam step on the mean squared error between the policy's and the dataset's actions."""
    idx = torch.randint(
        len(data["states"]), (batch_size,), generator=gen, device=data["states"].device
    )
    loss = F.mse_loss(policy(data["states"][idx]), data["actions"][idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


# --------------------------------------------------------------------------------------------------
# Evaluation: all episodes at once in a vector env, one batched forward per environment step.
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(policy: MLPPolicy, info: dict, state_stats, args: Args, device) -> dict:
    """Roll out args.eval_episodes episodes with the deterministic policy; the env seeds are
    dt.py's, so every method meets the same start states."""
    n = args.eval_episodes
    envs, horizon = make_eval_envs(info, n, args.eval_async)
    mean, std = (torch.as_tensor(x, device=device) for x in state_stats)
    returns, lengths, done = np.zeros(n), np.zeros(n, dtype=int), np.zeros(n, dtype=bool)
    policy.eval()
    obs, _ = envs.reset(seed=args.seed + 10_000)
    bar = tqdm(
        total=n, desc="evaluate", unit="episode", leave=False, dynamic_ncols=True, mininterval=1.0
    )
    t0 = time.time()
    for _ in range(horizon):
        states = (torch.as_tensor(obs, device=device, dtype=torch.float32) - mean) / std
        obs, r, term, trunc, _ = envs.step(policy(states).cpu().numpy())
        # a finished episode's slot is reset by the vector env: its steps no longer count
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        bar.update(int(done.sum()) - bar.n)
        bar.set_postfix(env_steps=int(lengths.sum()), refresh=False)
        if done.all():
            break
    elapsed = time.time() - t0
    bar.close()
    envs.close()
    policy.train()
    score = common.normalized_score(info, returns)
    episodes = {
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
        "normalized": score.tolist(),
    }
    means = {"return_mean": float(returns.mean()), "normalized_mean": float(score.mean())}
    return {
        **episodes,
        **means,
        "normalized_std": float(score.std()),
        "eval_env_steps_per_s": lengths.sum() / elapsed,
    }


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def thesis_column(args: Args) -> tuple[str, dict]:
    """The thesis column this run stands beside: BC (top 100%) or 10% BC; none for other
    percentages."""
    if args.top_pct == 100:
        return "BC, the IQL paper's", THESIS["bc"]
    if args.top_pct == 10:
        return "10% BC, the DT paper's", THESIS["bc-10"]
    return f"{args.top_pct:g}% BC", {}


def resumed_run_args(cli: Args) -> Args:
    """--resume RUN: that run's own flags from its config.json (dt.py's resumed_args, with bc.py's
    RUN_FLAGS). This command's run flags replace them; any other flag given is refused, not
    ignored."""
    if cli.resume is None:
        return cli
    run = Path(cli.resume)
    error = f"error: --resume {run}"
    if (run / "results.json").exists():
        raise SystemExit(
            f"{error}: that run has finished (results.json is there); nothing to resume."
        )
    try:
        saved = json.loads((run / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(f"{error}: no run of {SCRIPT} there (no readable config.json).") from None
    if not (run / "model.pt").is_file():
        raise SystemExit(
            f"{error}: no model.pt there yet (stopped before its first save); start again."
        )
    fields = {f.name: f.default for f in dataclasses.fields(Args)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    for name, value in asdict(cli).items():
        own = saved.get(name, fields[name])
        if name not in RUN_FLAGS and value != fields[name] and value != own:
            flag = f"--{name.replace('_', '-')}"
            raise SystemExit(
                f"{error} continues that run with its own flags; leave out {flag} {value} (the run "
                f"has {own})."
            )
    return Args(**(saved | {k: getattr(cli, k) for k in RUN_FLAGS}))


def load_resume(run_dir: Path, device) -> dict:
    """A stopped run's model.pt, read as data only (weights_only: loading cannot run code), onto
    `device` whatever device wrote it."""
    path = run_dir / "model.pt"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = f"not a checkpoint torch can read as data ({type(e).__name__})"
        raise SystemExit(
            f"error: --resume {run_dir}: its model.pt is {why}; start again."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD or ckpt.get("resume") is None:
        why = f"its model.pt holds no training state of {SCRIPT}"
        raise SystemExit(f"error: --resume {run_dir}: {why}; start again.")
    return ckpt


def stop_note(why: str, done: int, run_dir: Path) -> str:
    """What a stopped run says: where it is, and the one command that continues it."""
    return (
        f"interrupted ({why}): {run_dir / 'model.pt'} holds {done} updates; continue with "
        f"`python {SCRIPT} --resume {run_dir}`."
    )


def prepare(args: Args, device) -> tuple[dict, dict, dict, dict]:
    """The dataset's facts, the kept data on the device, what was kept, the policy's
    architecture."""
    try:
        episodes, info = common.load_dataset(args.env, args.dataset_path)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    keep = keep_best(episodes, args.top_pct, args.select)
    data = make_dataset(episodes, keep, args.normalize_states, device)
    kept_returns = np.array([float(episodes[i]["rewards"].sum()) for i in keep])
    kept = dict(episodes=len(keep), transitions=len(data["states"]))
    kept |= dict(return_min=float(kept_returns.min()), return_mean=float(kept_returns.mean()))
    kept["return_max"] = float(kept_returns.max())
    probe = common.make_env(info)
    max_action = np.asarray(probe.action_space.high, np.float64).tolist()
    probe.close()
    arch = dict(state_dim=info["obs_dim"], act_dim=info["act_dim"], hidden=list(args.hidden))
    return info, data, kept, arch | {"max_action": max_action}


def check_memory_flags(args: Args, arch: dict, device) -> None:
    """--batch-size and --eval-episodes against the memory they need, before the run folder is made
    (common.check_memory). An update keeps about sum(hidden) + 2 max(hidden) + state and action
    dims values per sample (the ReLU outputs for the backward, two gradients of the widest layer,
    the batch; 0.96-1.0x of the measured peak RSS rise at 10^5-4 x 10^5 samples, hidden 256 256,
    1024 and 64 64 64); an evaluation holds its envs and 2 max(hidden) values per episode."""
    widths, batch, n = arch["hidden"], args.batch_size, args.eval_episodes
    per_sample = sum(widths) + 2 * max(widths) + arch["state_dim"] + arch["act_dim"]
    need = 4.0 * batch * per_sample
    common.check_memory("--batch-size", batch, need, device, "a training update")
    need = common.eval_env_bytes(n, args.eval_async) + 4.0 * n * 2 * max(widths)
    common.check_memory("--eval-episodes", n, need, device, "an evaluation")


def make_checkpoint(policy, arch, args, info, state_stats, state: dict) -> dict:
    """model.pt: the weights with what evaluating them needs (architecture, dataset facts, state
    scale), and the training state that --resume continues from; plain tensors and dicts."""
    stats = dict(zip(("state_mean", "state_std"), map(torch.as_tensor, state_stats)))
    parts = {"method": METHOD, "arch": arch, "args": asdict(args), "dataset": info}
    parts["trained_updates"] = state["updates_done"]
    return {"model": policy.state_dict(), **parts, **stats, "resume": state}


def synchronize(device) -> None:
    """Wait for the work queued on the device (CUDA runs ahead of Python; a CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit(policy, opt, gen, data, args: Args, run_dir: Path, run_eval, save, state: dict) -> int:
    """args.updates Adam steps, from where a resumed run's `state` left off; evaluations and
    checkpoints on their schedule. A stop signal lets the current update and its log line finish,
    saves, and exits with the command that continues the run. Returns the updates done.
    The training clock runs over the updates between two pauses (a log line, an evaluation, a
    save), each interval closed by a device synchronize: it times the work the device did, not
    the launches (a GPU runs ahead of Python), and never syncs per update."""
    metrics, clock = run_dir / "metrics.jsonl", state["clock"]
    done, device = state["updates_done"], data["states"].device
    logged = trim_metrics(metrics, state["metrics_lines"]) if args.resume else []
    evaluated = {m["step"] for m in logged if "eval_normalized" in m}
    eval_due = lambda n: args.eval_every and n % args.eval_every == 0 and n < args.updates  # noqa: E731
    steps = range(done, args.updates)
    bar = tqdm(steps, "train", args.updates, initial=done, dynamic_ncols=True, mininterval=1)
    started = None  # when the open interval of updates began; None between intervals

    def close_interval() -> None:
        synchronize(device)
        clock["train_time_s"] += time.perf_counter() - started

    try:
        if eval_due(done) and done not in evaluated:
            run_eval(done)
        for step in bar:
            with signals_deferred():  # a stop signal waits for the update and its log line
                if started is None:
                    started = time.perf_counter()
                loss = update(policy, opt, data, args.batch_size, gen)
                done = step + 1
                log_due = step % args.log_every == 0 or done == args.updates
                if log_due:  # .item() syncs the GPU
                    log_metrics(metrics, step=step, loss=loss.item(), loss_action=loss.item())
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                saving = save_due(done, args.updates, args.eval_every, args.save_every)
                if log_due or eval_due(done) or saving:
                    close_interval()
                    started = None
            if eval_due(done):
                run_eval(done)
            if saving:
                save(done)
    except KeyboardInterrupt as stop:
        bar.close()
        if started is not None:
            close_interval()
        save(done)
        raise SystemExit(stop_note(str(stop) or "Ctrl-C", done, run_dir)) from None
    bar.close()
    return done


def train(args: Args) -> dict:
    t_start = time.time()
    args = resumed_run_args(args)
    device, threads = setup(args)
    ckpt = load_resume(Path(args.resume), device) if args.resume else None
    info, data, kept, arch = prepare(args, device)
    check_memory_flags(args, arch, device)
    run_dir = Path(args.resume) if args.resume else make_run_dir(args, info)
    fresh = None if args.resume else run_dir  # removed if it runs out of memory before it logs
    metrics = run_dir / "metrics.jsonl"
    config = {"method": METHOD, "args": asdict(args), "arch": arch, "dataset": info, "kept": kept}
    config |= {"device": str(device), "threads": threads, "git_commit": git_commit()}
    config |= {"torch": torch.__version__, "bf16": False}  # an fp32 MLP
    config = record_config(run_dir, config, ckpt["resume"] if ckpt else None)

    policy = MLPPolicy(**arch).to(device)
    # one kernel a step (ops.py)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr, fused=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    state = {
        "updates_done": 0,
        "metrics_lines": 0,
        "clock": {"train_time_s": 0.0, "wall_time_s": 0.0},
    }
    if ckpt is not None:
        policy.load_state_dict(ckpt["model"])
        restore_training_state(ckpt["resume"], opt, None, gen)
        state = ckpt["resume"] | {"clock": dict(ckpt["resume"]["clock"])}
    clock = state["clock"]
    print(
        f"run {run_dir.name}: {info['name']} ({info['source']} data), {args.top_pct:g}% BC on "
        f"{kept['episodes']} of {info['episodes']} trajectories ({kept['transitions']} steps, "
        f"returns {kept['return_min']:.0f} to {kept['return_max']:.0f}), device {device}, "
        f"{threads} CPU thread(s)"
        + (f", resumed at update {state['updates_done']}" if ckpt else "")
    )

    def run_eval(step: int) -> dict:
        with common.out_of_memory(
            "--eval-episodes", args.eval_episodes, device, "an evaluation", fresh
        ):
            res = evaluate(policy, info, data["state_stats"], args, device)
        score = {"eval_return": res["return_mean"], "eval_normalized": res["normalized_mean"]}
        log_metrics(metrics, step=step, eval_normalized_std=res["normalized_std"], **score)
        shown = f"{res['normalized_mean']:.1f} ± {res['normalized_std']:.1f}"
        tqdm.write(f"update {step}: normalized score {shown}")
        return res

    def save(n: int) -> None:
        wall = {"wall_time_s": clock["wall_time_s"] + time.time() - t_start}
        resume = training_state(n, opt, None, gen, clock | wall, metrics)
        saved = make_checkpoint(policy, arch, args, info, data["state_stats"], resume)
        save_atomic(saved, run_dir / "model.pt")

    old_handlers = catch_stop_signals()
    try:
        with common.out_of_memory("--batch-size", args.batch_size, device, "an update", fresh):
            done = fit(policy, opt, gen, data, args, run_dir, run_eval, save, state)
        res = run_eval(done)
    except KeyboardInterrupt as stop:  # in the final evaluation: the model is saved
        why = f"interrupted ({str(stop) or 'Ctrl-C'}) during the final evaluation"
        raise SystemExit(f"{why}; continue with `python {SCRIPT} --resume {run_dir}`.") from None
    finally:
        restore_signals(old_handlers)
    speed = {"train_updates_per_s": done / clock["train_time_s"] if clock["train_time_s"] else None}
    speed["wall_time_s"] = clock["wall_time_s"] + time.time() - t_start
    results = {**config, **res, "updates": done, "trained_updates": done, "run_dir": str(run_dir)}
    results |= speed
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    report(results, args, info)
    return results


def report(results: dict, args: Args, info: dict) -> None:
    """The score beside the thesis's column for this baseline."""
    column, numbers = thesis_column(args)
    thesis = numbers.get(info["name"], "no number for this dataset")
    print(
        f"normalized score {results['normalized_mean']:.1f} ± {results['normalized_std']:.1f} over "
        f"{args.eval_episodes} episodes ({common.SOURCE_LABEL[info['source']]} data, "
        f"{results['updates']} updates); thesis Table 1.3 ({column}, official D4RL): {thesis}"
    )
    print(f"results: {Path(results['run_dir']) / 'results.json'}")


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
