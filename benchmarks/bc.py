"""Behaviour cloning baselines on the same data as the method files: BC and X%BC, the BC and 10% BC columns of
Table 1.3 and the 10% BC column of Table 2.1.

    python benchmarks/bc.py --env hopper-medium-replay --dataset-path ../shared/d4rl-replica/hopper-medium-replay.hdf5
    python benchmarks/bc.py --env hopper-medium-replay --top-pct 10 --exp-name bc-10     # 10% BC, official file
    python benchmarks/run.py --preset cpu --methods bc bc-10 --data-dir ../shared/d4rl-replica   # beside the others

BC regresses the dataset's action on the state (mean squared error) with an MLP; X%BC first keeps only the
best X% of the trajectories by return (CORL's any_percent_bc: 256x256 ReLU MLP, tanh output, Adam 3e-4,
batch 256, 10^6 updates, states normalised with the kept data's mean and std). The thesis does not train
these itself: its BC numbers are the IQL paper's [65], its 10% BC numbers the DT paper's [7]. The DT paper's
%BC keeps the top X% of *timesteps* (whole trajectories, best first, up to X% of the steps), CORL's the top X%
of *trajectories*; `--select` picks either.

Reuses the method files' plumbing (seeds and device, run folder, metrics lines, vector-env evaluation) from
dt.py and the dataset facts from common.py, and writes the same run folder: config.json, metrics.jsonl,
results.json, model.pt.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

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
from dt import check_flags, git_commit, log_metrics, make_eval_envs, make_run_dir, setup  # noqa: E402

METHOD = "bc"


@dataclass
class Args:
    env: str = "hopper-medium-replay"
    """dataset: a D4RL gym-mujoco name such as `hopper-medium-replay` (with or without `-v2`), or a Minari
    id such as `mujoco/hopper/medium-v0`"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official file;
    several are concatenated (medium + expert = medium-expert)"""
    exp_name: str = METHOD
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}` (benchmarks/run.py: `bc`, `bc-10`)"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    top_pct: float = 100.0
    """X of X%BC: train on the best X% of the data by trajectory return; 100 is plain BC, 10 the thesis's
    10% BC"""
    select: Literal["trajectories", "timesteps"] = "trajectories"
    """what X% counts: `trajectories` (CORL's any_percent_bc: the best X% of the trajectories) or `timesteps`
    (the DT paper's %BC, the source of the thesis's 10% BC numbers: the best trajectories until they hold X%
    of the steps)"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer widths of the MLP policy (CORL's: 256 256)"""
    lr: float = 3e-4
    """Adam learning rate (CORL's; constant, no weight decay)"""
    batch_size: int = 256
    """transitions per update, drawn uniformly with replacement"""
    updates: int = 1_000_000
    """gradient updates (CORL's default 10^6)"""
    normalize_states: bool = True
    """standardise states with the kept data's mean and std (CORL's default); `--no-normalize-states` feeds
    them raw"""
    eval_episodes: int = 10
    """episodes per evaluation, all run at once in a vector env"""
    eval_every: int = 5000
    """evaluate before training and every N updates (0: only at the end)"""
    eval_async: bool = False
    """step the evaluation envs in subprocesses (gymnasium AsyncVectorEnv); pays off with many CPU cores"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_every: int = 1000
    """log the training loss every N updates"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1)"""

    def __post_init__(self):
        check_flags(self, "lr batch_size updates eval_episodes log_every", "seed eval_every threads")
        if not 0 < self.top_pct <= 100:  # NaN fails this test too
            raise SystemExit(f"error: --top-pct {self.top_pct}: must be in (0, 100]; 100 is plain BC, 10 is 10% BC.")
        if not all(h > 0 for h in self.hidden):
            raise SystemExit(f"error: --hidden {' '.join(map(str, self.hidden))}: every width must be > 0.")


# ---------------------------------------------------------------------------------------------------
# Data: the kept trajectories as two flat tensors on the training device; a batch is an index gather.
# ---------------------------------------------------------------------------------------------------


def keep_best(episodes: list[dict], top_pct: float, select: str) -> np.ndarray:
    """Indices of the episodes X%BC trains on, best undiscounted return first. `trajectories`: the best
    max(1, floor(X% of the episodes)), as CORL; `timesteps`: the best ones while their steps stay within X% of
    all steps (at least the best one), as the DT paper."""
    returns = np.array([float(ep["rewards"].sum()) for ep in episodes])
    order = np.argsort(-returns, kind="stable")  # ties: the earlier episode first, so the choice is reproducible
    if select == "trajectories":
        return order[: max(1, int(top_pct / 100 * len(episodes)))]
    lengths = np.array([len(ep["rewards"]) for ep in episodes])[order]
    budget = int(top_pct / 100 * lengths.sum())
    return order[: max(1, int(np.searchsorted(np.cumsum(lengths), budget, side="right")))]


def make_dataset(episodes: list[dict], keep: np.ndarray, normalize: bool, device) -> dict:
    """States and actions of the kept episodes; the state scale (CORL's: mean and std + 1e-3 of the kept
    states, or 0 and 1) is the one evaluation uses."""
    obs = np.concatenate([episodes[i]["observations"] for i in keep])
    act = np.concatenate([episodes[i]["actions"] for i in keep])
    mean, std = (obs.mean(0), obs.std(0) + 1e-3) if normalize else (np.zeros(obs.shape[1]), np.ones(obs.shape[1]))
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return {
        "states": torch.as_tensor((obs - mean) / std, dtype=torch.float32, device=device),
        "actions": torch.as_tensor(act, dtype=torch.float32, device=device),
        "state_stats": (mean, std),
    }


# ---------------------------------------------------------------------------------------------------
# Model: CORL's BC actor, a ReLU MLP whose tanh output is scaled to the action box.
# ---------------------------------------------------------------------------------------------------


class MLPPolicy(nn.Module):
    def __init__(self, state_dim: int, act_dim: int, hidden: tuple[int, ...], max_action: list[float]):
        super().__init__()
        widths, layers = (state_dim, *hidden), []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], act_dim), nn.Tanh())
        self.register_buffer("max_action", torch.as_tensor(max_action, dtype=torch.float32))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.max_action * self.net(states)


def update(policy: MLPPolicy, opt, data: dict, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """One Adam step on the mean squared error between the policy's and the dataset's actions."""
    idx = torch.randint(len(data["states"]), (batch_size,), generator=gen, device=data["states"].device)
    loss = F.mse_loss(policy(data["states"][idx]), data["actions"][idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------
# Evaluation: all episodes at once in a vector env, one batched forward per environment step.
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(policy: MLPPolicy, info: dict, state_stats, args: Args, device) -> dict:
    """Roll out args.eval_episodes episodes with the deterministic policy; the env seeds are dt.py's, so every
    method meets the same start states."""
    n = args.eval_episodes
    envs, horizon = make_eval_envs(info, n, args.eval_async)
    mean, std = (torch.as_tensor(x, device=device) for x in state_stats)
    returns, lengths, done = np.zeros(n), np.zeros(n, dtype=int), np.zeros(n, dtype=bool)
    policy.eval()
    obs, _ = envs.reset(seed=args.seed + 10_000)
    t0 = time.time()
    for _ in range(horizon):
        states = (torch.as_tensor(obs, device=device, dtype=torch.float32) - mean) / std
        obs, r, term, trunc, _ = envs.step(policy(states).cpu().numpy())
        returns += r * ~done  # a finished episode's slot is reset by the vector env: its steps no longer count
        lengths += ~done
        done |= term | trunc
        if done.all():
            break
    elapsed = time.time() - t0
    envs.close()
    policy.train()
    score = common.normalized_score(info, returns)
    episodes = {"returns": returns.tolist(), "lengths": lengths.tolist(), "normalized": score.tolist()}
    means = {"return_mean": float(returns.mean()), "normalized_mean": float(score.mean())}
    return {**episodes, **means, "normalized_std": float(score.std()), "eval_env_steps_per_s": lengths.sum() / elapsed}


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def thesis_column(args: Args) -> tuple[str, dict]:
    """The thesis column this run stands beside: BC (top 100%) or 10% BC; none for other percentages."""
    if args.top_pct == 100:
        return "BC, the IQL paper's", THESIS["bc"]
    if args.top_pct == 10:
        return "10% BC, the DT paper's", THESIS["bc-10"]
    return f"{args.top_pct:g}% BC", {}


def train(args: Args) -> dict:
    t_start = time.time()
    device, threads = setup(args)
    try:
        episodes, info = common.load_dataset(args.env, args.dataset_path)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    keep = keep_best(episodes, args.top_pct, args.select)
    data = make_dataset(episodes, keep, args.normalize_states, device)
    kept_returns = np.array([float(episodes[i]["rewards"].sum()) for i in keep])
    kept = dict(episodes=len(keep), transitions=len(data["states"]), return_min=float(kept_returns.min()),
                return_mean=float(kept_returns.mean()), return_max=float(kept_returns.max()))  # fmt: skip
    probe = common.make_env(info)
    max_action = np.asarray(probe.action_space.high, np.float64).tolist()
    probe.close()
    arch = dict(state_dim=info["obs_dim"], act_dim=info["act_dim"], hidden=list(args.hidden), max_action=max_action)
    run_dir = make_run_dir(args, info)
    metrics = run_dir / "metrics.jsonl"
    config = {"method": METHOD, "args": asdict(args), "arch": arch, "dataset": info, "kept": kept}
    config |= {"device": str(device), "threads": threads, "git_commit": git_commit(), "torch": torch.__version__}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))

    policy = MLPPolicy(**arch).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(
        f"run {run_dir.name}: {info['name']} ({info['source']} data), {args.top_pct:g}% BC on {kept['episodes']} of "
        f"{info['episodes']} trajectories ({kept['transitions']} steps, returns {kept['return_min']:.0f} to "
        f"{kept['return_max']:.0f}), device {device}, {threads} CPU thread(s)"
    )

    def run_eval(step: int) -> dict:
        res = evaluate(policy, info, data["state_stats"], args, device)
        score = {"eval_return": res["return_mean"], "eval_normalized": res["normalized_mean"]}
        log_metrics(metrics, step=step, eval_normalized_std=res["normalized_std"], **score)
        return res

    if args.eval_every:
        res = run_eval(0)
        print(f"update 0: normalized score {res['normalized_mean']:.1f}")
    trained, train_time = 0, 0.0
    bar = tqdm(range(args.updates), desc="train", dynamic_ncols=True, mininterval=1.0)
    try:
        for step in bar:
            t0 = time.time()
            loss = update(policy, opt, data, args.batch_size, gen)
            trained = step + 1
            if step % args.log_every == 0 or trained == args.updates:  # .item() syncs the GPU: not every step
                log_metrics(metrics, step=step, loss=loss.item(), loss_action=loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}")
            train_time += time.time() - t0
            if args.eval_every and trained % args.eval_every == 0 and trained < args.updates:
                res = run_eval(trained)
                bar.write(f"update {trained}: score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f}")
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted (Ctrl-C) after {trained} updates: saving the model trained so far")
    stats = dict(zip(("state_mean", "state_std"), map(torch.as_tensor, data["state_stats"])))
    parts = {"method": METHOD, "arch": arch, "args": asdict(args), "dataset": info, "trained_updates": trained}
    torch.save({"model": policy.state_dict(), **parts, **stats}, run_dir / "model.pt")  # plain tensors and dicts
    if trained < args.updates:
        raise SystemExit(f"stopped: {run_dir / 'model.pt'} holds {trained} updates (no final evaluation).")

    res = run_eval(trained)
    speed = {"train_updates_per_s": trained / train_time if train_time else None, "wall_time_s": time.time() - t_start}
    results = {**config, **res, "updates": trained, "trained_updates": trained, "run_dir": str(run_dir), **speed}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    label = common.SOURCE_LABEL[info["source"]]
    column, numbers = thesis_column(args)
    thesis = numbers.get(info["name"], "no number for this dataset")
    print(
        f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over {args.eval_episodes} "
        f"episodes ({label} data, {trained} updates); thesis Table 1.3 ({column}, official D4RL): {thesis}"
    )
    print(f"results: {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
