"""Decision Transformer (thesis §1.3.2, Eq. 1.1-1.4): offline RL as conditional sequence modelling.

    python dt.py --env hopper-medium-replay                       # the original DT (deterministic, l2)
    python dt.py --env hopper-medium-replay --policy gaussian     # Gaussian NLL (Eq. 1.3-1.4), ODT-O-style
    python dt.py --env hopper-medium-replay --dataset-path FILE   # any D4RL-layout .hdf5 or DT .pkl
    python dt.py --checkpoint runs/RUN/model.pt --updates 0       # evaluate a trained model again

One file: arguments, data, model, loss, evaluation, training, in the order the thesis introduces them.
Blocks marked PLUMBING are the same, byte for byte, in every method file that has them; the rest is the
method. Shared with the other method files is only common.py (datasets, env ids, normalized scores).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import random
import subprocess
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

import common

METHOD = "dt"
DEFAULT_ENV = "hopper-medium-replay"  # the dataset without --env or --checkpoint


@dataclass
class Args:
    env: Optional[str] = None
    """dataset: a D4RL gym-mujoco name such as `hopper-medium-replay` (with or without `-v2`), or a Minari
    id such as `mujoco/hopper/medium-v0`. Default: the checkpoint's dataset, else hopper-medium-replay"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official file;
    several are concatenated (medium + expert = medium-expert). Without it the official file is read from
    $D4RL_DATASET_DIR (default ~/.d4rl/datasets), downloaded there first if missing"""
    exp_name: str = METHOD
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    policy: Literal["deterministic", "gaussian"] = "deterministic"
    """`deterministic`: l2 regression, the original DT; `gaussian`: diagonal Gaussian NLL (Eq. 1.3-1.4),
    the offline ODT variant (ODT-O) of Table 1.3"""
    timestep_embedding: bool = True
    """a learned timestep embedding added to every token of a step (the DT paper's, in place of GPT-2's
    positions); `--no-timestep-embedding` drops it"""
    context_len: int = 20
    """K, the number of timesteps (each = return, state, action tokens) the transformer sees (Eq. 1.2)"""
    n_layer: int = 3
    """transformer blocks"""
    n_head: int = 1
    """attention heads per block"""
    n_embd: int = 128
    """embedding (hidden) size"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches"""
    max_ep_len: int = 1000
    """size of the timestep embedding table; later timesteps share the last entry"""
    batch_size: int = 64
    """segments per update"""
    lr: float = 1e-4
    """AdamW peak learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay, applied to weight matrices only (not biases, LayerNorm)"""
    warmup_steps: int = 10_000
    """linear learning-rate warmup, in updates"""
    updates: int = 100_000
    """gradient updates; with --checkpoint, 0 only evaluates it and N > 0 trains on from its weights"""
    grad_clip: float = 0.25
    """clip the global gradient norm at this value (> 0), before every optimizer step"""
    rtg_scale: float = 1000.0
    """returns-to-go are divided by this before they enter the model"""
    target_return: Optional[float] = None
    """return to condition on at evaluation; default per domain: hopper 3600, walker2d 5000, halfcheetah 6000"""
    eval_episodes: int = 10
    """episodes per evaluation, all run at once in a vector env"""
    eval_every: int = 10_000
    """evaluate before training and every N updates (0: only at the end)"""
    eval_async: bool = False
    """step the evaluation envs in subprocesses (gymnasium AsyncVectorEnv); pays off with many CPU cores"""
    compile: bool = False
    """torch.compile the model for training (CUDA)"""
    bf16: bool = True
    """bfloat16 autocast where the hardware has it natively (CUDA; CPUs with AVX512-BF16 or AMX); fp32 elsewhere"""
    checkpoint: Optional[str] = None
    """a `model.pt` from an earlier run: start from its weights, architecture and state normalisation (the
    architecture flags are ignored); `--updates 0` only evaluates it, on its own dataset unless --env says"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_every: int = 100
    """log the training loss every N updates"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1; all of them slow down
    sharply when another program keeps one busy)"""
    track: bool = False
    """also send the config, every logged metric and the final results to Weights & Biases (`pip install -e
    ".[track]"`); metrics.jsonl stays the record. With WANDB_MODE=offline the run is kept locally to sync later"""
    wandb_project_name: str = "seqrl"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B team or user of --track (default: your W&B default entity)"""
    capture_video: bool = False
    """write video.mp4 of the final evaluation's first episode into the run folder (MuJoCo's offscreen
    renderer; headless machines use MUJOCO_GL=egl, the default here when no display is set, or osmesa)"""

    def __post_init__(self):
        positive = (
            "context_len n_layer n_head n_embd max_ep_len batch_size lr grad_clip rtg_scale eval_episodes log_every"
        )
        check_flags(self, positive, "seed weight_decay warmup_steps updates eval_every threads")
        if not 0 <= self.dropout < 1:
            raise SystemExit(f"error: --dropout {self.dropout}: must be in [0, 1).")
        if self.n_embd % self.n_head:
            raise SystemExit(f"error: --n-embd {self.n_embd} must be divisible by --n-head {self.n_head}.")
        if self.target_return is not None and not math.isfinite(self.target_return):
            raise SystemExit(f"error: --target-return {self.target_return}: pass a finite return, e.g. 3600.")
        if self.updates == 0 and self.checkpoint is None:
            raise SystemExit("error: --updates 0 trains nothing; add --checkpoint runs/RUN/model.pt to evaluate one.")
        if self.track and importlib.util.find_spec("wandb") is None:
            raise SystemExit('error: --track needs wandb: pip install -e ".[track]" (or leave out --track).')
        if self.capture_video and not os.environ.get("DISPLAY"):  # before MuJoCo is imported, which reads it once
            os.environ.setdefault("MUJOCO_GL", "egl")


# Table 1.3 (official D4RL v2), DT and ODT-O columns, printed beside our score. The DT column holds the DT
# paper's values where the thesis's table was damaged in extraction (9.79, 9.99, 8.98 -> 67.6, 66.6, 86.8).
# fmt: off
THESIS = {
    "deterministic": {"halfcheetah-medium": 42.6, "hopper-medium": 67.6, "walker2d-medium": 74.0,
                      "halfcheetah-medium-replay": 36.6, "hopper-medium-replay": 82.7,
                      "walker2d-medium-replay": 66.6, "halfcheetah-medium-expert": 86.8,
                      "hopper-medium-expert": 107.6, "walker2d-medium-expert": 108.1},
    "gaussian": {"halfcheetah-medium": 42.72, "hopper-medium": 66.95, "walker2d-medium": 72.19,
                 "halfcheetah-medium-replay": 39.99, "hopper-medium-replay": 86.64, "walker2d-medium-replay": 68.92,
                 "halfcheetah-medium-expert": 88.76, "hopper-medium-expert": 107.24, "walker2d-medium-expert": 108.65},
}
# fmt: on
TARGET_RETURNS = {"hopper": 3600.0, "walker2d": 5000.0, "halfcheetah": 6000.0}  # the DT paper's
MODALITIES = ("rtg", "states", "actions")  # the tokens of a step, in order (Eq. 1.1)
READ = {"action": "states"}  # a_t is read off the s_t token: it has seen g_t and s_t, not a_t (Eq. 1.2)
ARCH = "policy timestep_embedding context_len n_layer n_head n_embd dropout max_ep_len rtg_scale".split()


# --- Data: trajectories as one set of flat tensors on the training device; a batch is an index gather.
def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """g_t = sum_{t' >= t} r_t', the undiscounted return-to-go of §1.3.1 (the g tokens of Eq. 1.1)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


def make_dataset(episodes: list[dict], device, rtg_scale: float, max_ep_len: int, state_stats=None) -> dict:
    """Per-step tensors under `steps` (every one is gathered into a batch) and the episode boundaries.
    `state_stats` (mean, std): a checkpoint's, so that training on and evaluating see its state scale."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    mean, std = state_stats if state_stats is not None else (obs.mean(0), obs.std(0) + 1e-6)
    lengths = np.array([len(ep["rewards"]) for ep in episodes])
    steps = {
        "states": torch.as_tensor((obs - mean) / std, dtype=torch.float32),
        "actions": torch.as_tensor(np.concatenate([ep["actions"] for ep in episodes])),
        "rtg": torch.as_tensor(np.concatenate([returns_to_go(ep["rewards"]) for ep in episodes])[:, None] / rtg_scale),
        "timesteps": torch.as_tensor(np.concatenate([np.minimum(np.arange(n), max_ep_len - 1) for n in lengths])),
    }
    bounds = {"ep_start": torch.as_tensor(np.cumsum(lengths) - lengths), "ep_len": torch.as_tensor(lengths)}
    state_stats = (np.asarray(mean, np.float32), np.asarray(std, np.float32))
    return {
        "steps": {k: v.to(device) for k, v in steps.items()},
        **{k: v.to(device) for k, v in bounds.items()},
        "state_stats": state_stats,
    }


def sample_batch(data: dict, batch_size: int, K: int, gen: torch.Generator) -> dict:
    """Segments of K steps: the trajectory is drawn with probability proportional to its length, the start
    uniformly inside it. A segment that runs past the episode's end is left-padded (as in DT) so that its
    last position is always real, like at evaluation; `mask` marks the real positions, padding is zeros."""
    ep = torch.multinomial(data["ep_len"].float(), batch_size, replacement=True, generator=gen)
    length = data["ep_len"][ep]
    start = (torch.rand(batch_size, generator=gen, device=length.device) * length).long()
    offset = torch.arange(K, device=length.device) - (K - torch.clamp(length - start, max=K))[:, None]  # (B, K)
    mask = offset >= 0
    idx = data["ep_start"][ep, None] + start[:, None] + offset.clamp(min=0)
    batch = {k: v[idx] * mask.view(*mask.shape, *[1] * (v.dim() - 1)) for k, v in data["steps"].items()}
    return dict(batch, mask=mask)


# --- Model: a GPT over interleaved (g_t, s_t, a_t) tokens (Eq. 1.1); a_t is read off the s_t token.
class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, allowed, return_attn=False):
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in self.qkv(x).split(C, dim=2))
        if return_attn:  # explicit softmax, for analysis only: the weights themselves are wanted (B, nh, T, T)
            att = ((q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))).masked_fill(~allowed, float("-inf")).softmax(-1)
            y = att @ v  # (B, nh, T, hs)
        else:
            att = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout * self.training)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C))), att


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 layout, ReLU as in the DT code and Table 1.1)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x, allowed, return_attn=False):
        y, att = self.attn(self.ln1(x), allowed, return_attn)
        x = x + y
        return x + self.mlp(self.ln2(x)), att


def attention_mask(K: int, M: int, mask, device) -> torch.Tensor:
    """Which keys each of the M*K tokens may attend to: itself and everything before it (a_t ~ pi(. | Gamma_t),
    Eq. 1.2), minus padded steps; every token still sees itself, so that no row is empty."""
    allowed = torch.ones(M * K, M * K, dtype=torch.bool, device=device).tril()
    if mask is None:
        return allowed
    eye = torch.eye(M * K, dtype=torch.bool, device=device)
    return (allowed & mask.repeat_interleave(M, dim=1)[:, None, None, :]) | eye


def bounded_log_std(x: torch.Tensor) -> torch.Tensor:
    """A head's raw log-std squashed into [-5, 2], ODT's bounds, so the NLL cannot run off on a constant target."""
    return -5.0 + 3.5 * (torch.tanh(x) + 1)


class DecisionTransformer(nn.Module):
    def __init__(
        self, state_dim, act_dim, policy, timestep_embedding, context_len, n_layer, n_head, n_embd, dropout,
        max_ep_len, rtg_scale
    ):  # fmt: skip
        super().__init__()
        self.K, self.max_ep_len, self.rtg_scale = context_len, max_ep_len, rtg_scale
        # One linear embedding per modality, in token order (Eq. 1.1), plus (--timestep-embedding) a timestep
        # embedding added to every token of a step; no positional embedding (the DT code removes GPT-2's).
        self.dims = {"rtg": 1, "states": state_dim, "actions": act_dim}
        self.embed = nn.ModuleDict({m: nn.Linear(self.dims[m], n_embd) for m in MODALITIES})
        self.embed_t = nn.Embedding(max_ep_len, n_embd) if timestep_embedding else None
        self.embed_ln, self.drop = nn.LayerNorm(n_embd), nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # Eq. 1.3: mean and (for the Gaussian policy) log-std of a diagonal Gaussian over a_t.
        self.gaussian = {"action": policy == "gaussian"}
        self.heads = nn.ModuleDict({"action": nn.Linear(n_embd, act_dim * (1 + self.gaussian["action"]))})

    def forward(self, x: dict, return_attn=False):
        """x: rtg (B, K, 1), states (B, K, m_s), actions (B, K, m_a), timesteps (B, K) and optionally mask (B, K),
        True on real steps. Returns {task: (mean, log-std or None)}, each (B, K, dim), and the per-block attention
        weights (B, nh, M*K, M*K) when return_attn."""
        B, K, M = *x["states"].shape[:2], len(MODALITIES)
        t = 0.0 if self.embed_t is None else self.embed_t(x["timesteps"])
        tokens = torch.stack([self.embed[m](x[m]) + t for m in MODALITIES], dim=2)  # (B, K, M, C)
        h = self.drop(self.embed_ln(tokens.reshape(B, M * K, -1)))  # g_1, s_1, a_1, g_2, ...
        allowed, attns = attention_mask(K, M, x.get("mask"), h.device), []
        for block in self.blocks:
            h, att = block(h, allowed, return_attn)
            attns.append(att)
        h = self.ln_f(h).reshape(B, K, M, -1)
        preds = {}
        for task, head in self.heads.items():
            out = head(h[:, :, MODALITIES.index(READ[task])])
            mean, log_std = out.chunk(2, dim=-1) if self.gaussian[task] else (out, None)
            # Actions live in [-1, 1]: the mean is tanh-squashed, as in DT's deterministic head. Where Eq. 1.3 is
            # silent, the Gaussian policy keeps that mean and the plain NLL of Eq. 1.4, without ODT's
            # tanh-transformed distribution and entropy constraint; evaluation acts with the mean.
            mean = torch.tanh(mean) if task == "action" else mean
            preds[task] = (mean, None if log_std is None else bounded_log_std(log_std))
        return preds, attns


def masked_mean(per_step: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over the real positions (the 1/K E[sum_k ...] of Eq. 1.4, padding excluded)."""
    return (per_step * mask).sum() / mask.sum().clamp(min=1)


def head_loss(mean, log_std, target, mask) -> torch.Tensor:
    """Diagonal Gaussian NLL summed over dimensions (Eq. 1.4), or with log_std None DT's l2 loss (mean squared
    error over dimensions); averaged over the real positions, in float32 even under autocast."""
    mean, target = mean.float(), target.float()
    if log_std is None:
        return masked_mean(((mean - target) ** 2).mean(-1), mask)
    nll = 0.5 * ((target - mean) / log_std.float().exp()) ** 2 + log_std.float() + 0.5 * math.log(2 * math.pi)
    return masked_mean(nll.sum(-1), mask)


def update(model, opt, batch: dict, grad_clip: float, autocast) -> tuple[dict, torch.Tensor]:
    """One gradient step on the action loss; returns the loss (detached) and the gradient norm before clipping."""
    with autocast:
        preds, _ = model(batch)
    loss = head_loss(*preds["action"], batch["actions"], batch["mask"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return {"action": loss.detach()}, grad_norm


# --- Evaluation: all episodes at once in a vector env, one batched forward per environment step.
def make_eval_envs(info: dict, n: int, asynchronous: bool, video: Optional[str] = None):
    """PLUMBING: n copies of the dataset's env in one vector env (the first one filmed when `video` names an
    MP4), and the episode horizon (the TimeLimit)."""
    import gymnasium as gym

    vector_env = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    envs = vector_env([functools.partial(common.make_env, info, video if i == 0 else None) for i in range(n)])
    probe = common.make_env(info)
    horizon = probe.spec.max_episode_steps or 1000
    probe.close()
    return envs, horizon


@torch.no_grad()
def evaluate(model, info, state_stats, args, target_return, device, autocast, recorder=None, video=None) -> dict:
    """Roll out args.eval_episodes episodes conditioned on target_return. `recorder(attns, alive)`, when
    given, receives the attention of every step with a full context (benchmarks/attention.py)."""
    n, K = args.eval_episodes, model.K
    envs, horizon = make_eval_envs(info, n, args.eval_async, video)
    low, high = (torch.as_tensor(b[0], device=device) for b in (envs.action_space.low, envs.action_space.high))
    mean, std = (torch.as_tensor(x, device=device) for x in state_stats)
    buf = {m: torch.zeros(n, horizon, d, device=device) for m, d in model.dims.items()}
    buf["timesteps"] = torch.arange(horizon, device=device).clamp(max=model.max_ep_len - 1).expand(n, -1)
    buf["rtg"][:, 0] = target_return / model.rtg_scale  # g_1
    returns, lengths, done = np.zeros(n), np.zeros(n, dtype=int), np.zeros(n, dtype=bool)
    model.eval()
    obs, _ = envs.reset(seed=args.seed + 10_000)
    t0 = time.time()
    for t in range(horizon):
        buf["states"][:, t] = (torch.as_tensor(obs, device=device, dtype=torch.float32) - mean) / std
        ctx = slice(max(0, t - K + 1), t + 1)  # Gamma_t (Eq. 1.2): the last K steps; at the start a shorter context
        record = recorder is not None and t + 1 >= K
        with autocast:
            preds, attns = model({k: v[:, ctx] for k, v in buf.items()}, return_attn=record)
        buf["actions"][:, t] = torch.maximum(torch.minimum(preds["action"][0][:, -1].float(), high), low)
        if record:
            recorder(attns, torch.as_tensor(~done, device=device))
        obs, r, term, trunc, _ = envs.step(buf["actions"][:, t].cpu().numpy())
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        if done.all() or t + 1 == horizon:  # no slot for g_{t+1} past the horizon
            break
        r = torch.as_tensor(r, device=device, dtype=torch.float32)[:, None]
        buf["rtg"][:, t + 1] = buf["rtg"][:, t] - r / model.rtg_scale  # DT's rule: g_{t+1} = g_t - r_t
    elapsed = time.time() - t0
    envs.close()
    model.train()
    score = common.normalized_score(info, returns)
    episodes = {"returns": returns.tolist(), "lengths": lengths.tolist(), "normalized": score.tolist()}
    means = {"return_mean": float(returns.mean()), "normalized_mean": float(score.mean())}
    return {**episodes, **means, "normalized_std": float(score.std()), "eval_env_steps_per_s": lengths.sum() / elapsed}


# --- Training
def check_flags(args, positive: str, non_negative: str) -> None:
    """PLUMBING: one message per bad flag, naming it and its value (NaN fails both tests)."""
    for names, ok, rule in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names.split():
            if not ok(getattr(args, name)):
                raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(args, name)}: must be {rule}.")


def setup(args) -> tuple[torch.device, int]:
    """PLUMBING: threads, seeds and the device, checked before anything is written."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads or max(1, cores // 2)
    torch.set_num_threads(threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(auto if args.device == "auto" else args.device)
    except RuntimeError:
        raise SystemExit(f"error: --device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: this torch sees no CUDA GPU; use --device cpu (or auto).")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, threads


def bf16_native(device: torch.device) -> bool:
    """PLUMBING: CUDA, or a CPU with native bf16 (AVX512-BF16, AMX); elsewhere bf16 is emulated, slower than fp32."""
    return device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_checkpoint(path: Optional[str], device) -> Optional[dict]:
    """PLUMBING: a model.pt this script wrote, read as data only (weights_only: loading cannot run code)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise SystemExit(f"error: --checkpoint {path}: no such file (expected runs/RUN/model.pt).")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = f"not a checkpoint torch can read as data ({type(e).__name__}); pass a model.pt that {METHOD}.py wrote"
        raise SystemExit(f"error: --checkpoint {path}: {why}.") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD:
        found = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise SystemExit(f"error: --checkpoint {path} was written by {found or 'another program'}, not {METHOD}.py.")
    return ckpt


def load_data(args, ckpt: Optional[dict]) -> tuple[Optional[list], dict]:
    """PLUMBING: the dataset of --env / --dataset-path, else the checkpoint's. Evaluating a checkpoint on its
    own dataset needs only the recorded dataset facts, not the file; another domain's data is refused."""
    recorded = ckpt["dataset"] if ckpt is not None else None
    if recorded is not None and args.env is None and not args.dataset_path and args.updates == 0:
        return None, recorded
    name = args.env or (recorded["name"] if recorded is not None else DEFAULT_ENV)
    paths = args.dataset_path or (tuple(recorded["path"] or ()) if recorded is not None and args.env is None else ())
    try:
        episodes, info = common.load_dataset(name, paths)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    facts = ("env_id", "obs_dim", "act_dim")
    if recorded is not None and any(recorded[k] != info[k] for k in facts):
        raise SystemExit(
            f"error: --checkpoint {args.checkpoint} was trained on {recorded['name']} ({recorded['env_id']}), "
            f"not on data of {info['env_id']} like {name}; leave out --env to use its own dataset."
        )
    return episodes, info


def make_run_dir(args, info: dict) -> Path:
    """PLUMBING: runs/{env}__{exp_name}__{seed}__{time}; an existing folder is never reused."""
    name = f"{info['name'].replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.runs_dir) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise SystemExit(f"error: run folder {run_dir} already exists; wait a second or change --exp-name.") from None
    except OSError as e:
        raise SystemExit(f"error: --runs-dir {args.runs_dir}: cannot make a run folder there ({e.strerror}).") from None
    return run_dir


def log_metrics(path: Path, **metrics) -> None:
    """PLUMBING: one JSON line, appended and closed at once, so a killed run keeps every line it logged; also
    to W&B once --track has started a run there."""
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.log(metrics, step=metrics.get("step"))


def start_tracking(args, config: dict, run_dir: Path) -> None:
    """PLUMBING: --track: a W&B run named like the run folder, with the full config (CleanRL's convention)."""
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=config, name=run_dir.name,
                   dir=run_dir)  # fmt: skip


def finish_tracking(results: dict) -> None:
    """PLUMBING: --track: the final numbers become the W&B run's summary."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float))})
        wandb.finish()


def git_commit() -> Optional[str]:
    """PLUMBING"""
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True)
        return git.stdout.decode().strip() if git.returncode == 0 else None
    except Exception:
        return None


def make_optimizer(model, args):
    """AdamW with weight decay on matrices only, as in nanoGPT (learned positions are not weights), and a
    linear warmup."""
    wd, named = args.weight_decay, [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p.dim() >= 2 and not n.startswith("pos_") for n, p in named]
    groups = [{"params": [p for (_, p), d in zip(named, decay) if d == on], "weight_decay": wd * on} for on in (1, 0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps)))


def train(args: Args) -> dict:
    t_start = time.time()
    device, threads = setup(args)
    ckpt = load_checkpoint(args.checkpoint, device)
    episodes, info = load_data(args, ckpt)
    dims = {"state_dim": info["obs_dim"], "act_dim": info["act_dim"]}
    arch = ckpt["arch"] if ckpt is not None else {**{k: getattr(args, k) for k in ARCH}, **dims}
    domain = info["env_id"].split("-")[0].lower()
    target_return = args.target_return if args.target_return is not None else TARGET_RETURNS.get(domain)
    if target_return is None:
        raise SystemExit(f"error: no default target return for {info['env_id']}; pass --target-return.")
    if args.capture_video:
        try:
            common.check_video(info)
        except common.DatasetError as e:
            raise SystemExit(f"error: {e}") from None
    run_dir = make_run_dir(args, info)
    metrics = run_dir / "metrics.jsonl"
    config = {"method": METHOD, "args": asdict(args), "arch": arch, "dataset": info, "target_return": target_return}
    config |= {"device": str(device), "threads": threads, "git_commit": git_commit(), "torch": torch.__version__}
    # the flags the evaluated model was trained with: a checkpoint's when this run only evaluates it
    config["trained_with"] = ckpt["args"] if ckpt is not None and not args.updates else asdict(args)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    start_tracking(args, config, run_dir)

    model = DecisionTransformer(**arch).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    state_stats = tuple(np.asarray(ckpt[k].cpu()) for k in ("state_mean", "state_std")) if ckpt is not None else None
    bf16 = args.bf16 and bf16_native(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"run {run_dir.name}: {info['name']} ({info['source']} data), {n_params:.2f}M parameters, device {device}, "
        f"{threads} CPU thread(s), {'bf16' if bf16 else 'fp32'}"
    )

    def run_eval(step: int, video=None) -> dict:
        res = evaluate(model, info, state_stats, args, target_return, device, autocast, video=video)
        score = {"eval_return": res["return_mean"], "eval_normalized": res["normalized_mean"]}
        log_metrics(metrics, step=step, eval_normalized_std=res["normalized_std"], **score)
        return res

    trained, train_time = 0, 0.0
    if args.updates:
        data = make_dataset(episodes, device, arch["rtg_scale"], arch["max_ep_len"], state_stats)
        state_stats = data["state_stats"]
        opt, sched = make_optimizer(model, args)
        fwd = torch.compile(model) if args.compile else model
        gen = torch.Generator(device=device).manual_seed(args.seed)

        if args.eval_every:
            res = run_eval(0)
            print(f"update 0: normalized score {res['normalized_mean']:.1f}")
        bar = tqdm(range(args.updates), desc="train", dynamic_ncols=True, mininterval=1.0)
        try:
            for step in bar:
                t0 = time.time()
                b = sample_batch(data, args.batch_size, arch["context_len"], gen)
                lr = sched.get_last_lr()[0]  # the rate this update uses
                losses, grad_norm = update(fwd, opt, b, args.grad_clip, autocast)
                sched.step()
                trained = step + 1
                if step % args.log_every == 0 or trained == args.updates:  # .item() syncs the GPU: not every step
                    loss = {f"loss_{k}": v.item() for k, v in losses.items()}
                    loss["loss"] = sum(loss.values())
                    log_metrics(metrics, step=step, grad_norm=grad_norm.item(), lr=lr, **loss)
                    bar.set_postfix(loss=f"{loss['loss']:.4f}")
                train_time += time.time() - t0
                if args.eval_every and trained % args.eval_every == 0 and trained < args.updates:
                    res = run_eval(trained)
                    bar.write(f"update {trained}: score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f}")
        except KeyboardInterrupt:
            bar.close()
            print(f"\ninterrupted (Ctrl-C) after {trained} updates: saving the model trained so far")
        total = trained + (ckpt["trained_updates"] if ckpt is not None else 0)
        stats = {"state_mean": torch.as_tensor(state_stats[0]), "state_std": torch.as_tensor(state_stats[1])}
        parts = {"method": METHOD, "arch": arch, "args": asdict(args), "dataset": info, "trained_updates": total}
        torch.save({"model": model.state_dict(), **parts, **stats}, run_dir / "model.pt")
        if trained < args.updates:
            raise SystemExit(
                f"stopped: {run_dir / 'model.pt'} holds {total} updates; evaluate it with "
                f"`python {METHOD}.py --checkpoint {run_dir / 'model.pt'} --updates 0`."
            )

    res = run_eval(trained, video=str(run_dir / "video.mp4") if args.capture_video else None)
    total = trained + (ckpt["trained_updates"] if ckpt is not None else 0)
    speed = {"train_updates_per_s": trained / train_time if trained else None, "wall_time_s": time.time() - t_start}
    speed["bf16"] = bf16
    results = {**config, **res, "updates": trained, "trained_updates": total, "run_dir": str(run_dir), **speed}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    finish_tracking(results)
    label = common.SOURCE_LABEL[info["source"]]
    column = "DT" if arch["policy"] == "deterministic" else "ODT-O"
    thesis = THESIS[arch["policy"]].get(info["name"], "no number for this dataset")
    print(
        f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over {args.eval_episodes} "
        f"episodes ({label} data, {total} updates); thesis Table 1.3 ({column}, official D4RL, 10^5 updates): {thesis}"
    )
    print(f"results: {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
