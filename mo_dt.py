"""Multi-Objective Decision Transformer (thesis §1.4.1, §1.4.3, Eq. 1.3-1.10, Alg. 1): DT that
predicts the action, the next state and the next return-to-go, on one weighted sum of the losses.

    python mo_dt.py --env hopper-medium-replay                        # Table 1.3's MO-DT column
    python mo_dt.py --env hopper-medium-replay --no-gaussian-heads    # Fig. 1.4a: MSE heads
    python mo_dt.py --env hopper-medium-replay --n-head 1             # Fig. 1.4b: one head
    python mo_dt.py --env hopper-medium-replay --schedule alternating # Ch. 3's sequential regime
    python mo_dt.py --env hopper-medium-replay --rtg-update subtract  # DT's g_{t+1} = g_t - r_t
    python mo_dt.py --checkpoint runs/RUN/model.pt --updates 0        # evaluate a trained model

One file, the method first: its flags, data, model, objective and update,
the action step and evaluation, train() (Alg. 1); below the PLUMBING banner the run's
infrastructure (run folder, checkpoints, exact resume, stop signals, tracking). Blocks marked
PLUMBING are the same, byte for byte, in every method file that has them. Shared with the other
method files is only common.py (datasets, env ids, normalized scores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import signal
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

METHOD = "mo_dt"
DEFAULT_ENV = "hopper-medium-replay"  # the dataset without --env or --checkpoint


@dataclass
class Args:
    env: Optional[str] = None
    """dataset: a D4RL gym-mujoco name such as `hopper-medium-replay` (with or without `-v2`), or a
    Minari id such as `mujoco/hopper/medium-v0`. Default: the checkpoint's dataset, else
    hopper-medium-replay"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official
    file; several are concatenated (medium + expert = medium-expert). Without it the official file
    is read from $D4RL_DATASET_DIR (default ~/.d4rl/datasets), downloaded there first if missing"""
    lambdas: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    """loss weights (lambda_DT, lambda_s, lambda_g) of Eq. 1.9, on the simplex of Eq. 1.10
    (non-negative, summing to 1); Table 1.1: uniform"""
    gaussian_heads: bool = True
    """Gaussian NLL heads for the next state and next return (Eq. 1.5-1.8); `--no-gaussian-heads`
    trains those two with MSE instead (Fig. 1.4a's ablation); the action head stays Gaussian"""
    schedule: Literal["joint", "alternating"] = "joint"
    """`joint`: one optimizer step on sum_i lambda_i L_i per update (Eq. 1.9, Alg. 1 line 12);
    `alternating`: one step on lambda_i L_i per task in turn, same batch (Ch. 3's regime, Thm 3)"""
    rtg_update: Literal["model", "subtract"] = "model"
    """next return-to-go at evaluation: `model` predicts it with the return head (Eq. 1.16, Alg. 1
    line 23); `subtract` is DT's rule g_{t+1} = g_t - r_t"""
    timestep_embedding: bool = False
    """add a learned timestep embedding to every token of a step, as DT does. Off by default:
    Table 1.1 says "positional embedding: No" (ODT's code builds one but never uses it)"""
    context_len: int = 20
    """K, the number of timesteps the transformer sees (Eq. 1.2), each made of its tokens: return,
    state, action"""
    n_layer: int = 4
    """transformer blocks (Table 1.1)"""
    n_head: int = 4
    """attention heads per block (Table 1.1; 1 for the Fig. 1.4b ablation)"""
    n_embd: int = 256
    """embedding (hidden) size (Table 1.1)"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches"""
    max_ep_len: int = 1000
    """size of the timestep embedding table; later timesteps share the last entry"""
    batch_size: int = 256
    """segments per update"""
    lr: float = 1e-4
    """LAMB peak learning rate"""
    weight_decay: float = 1e-3
    """LAMB weight decay, applied to weight matrices only (not biases, LayerNorm)"""
    warmup_steps: int = 10_000
    """linear learning-rate warmup, in updates"""
    updates: int = 100_000
    """gradient updates; with --checkpoint, 0 only evaluates it, N > 0 trains on from its weights"""
    grad_clip: float = 0.25
    """clip the global gradient norm at this value (> 0), before every optimizer step"""
    rtg_scale: float = 1000.0
    """returns-to-go are divided by this before they enter the model"""
    target_return: Optional[float] = None
    """the return evaluation conditions on (Table 1.2: hopper 7200, walker2d 10000,
    halfcheetah 12000)"""
    eval_episodes: int = 10
    """episodes per evaluation, all run at once in a vector env"""
    eval_context: Optional[int] = None
    """K' <= K: evaluate on the last K' steps instead of K (§1.3.2: the context "may be shorter
    during evaluation than the one used during training"; the ODT code evaluates with 5). Default:
    K, the checkpoint's with --checkpoint"""
    exp_name: str = METHOD
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    compile: bool = False
    """torch.compile for training: on CUDA the whole update, replayed as CUDA graphs; on a CPU the
    model. Its first updates are timed apart (compile_time_s in results.json)"""
    bf16: bool = True
    """bfloat16 autocast where the hardware has it natively (CUDA; CPUs with AVX512-BF16 or AMX);
    fp32 elsewhere"""
    eval_async: bool = False
    """evaluation envs stepped in subprocesses (gymnasium AsyncVectorEnv): for many CPU cores"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1; all of them slow
    down sharply when another program keeps one busy)"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    track: bool = False
    """also send the config, every logged metric and the final results to Weights & Biases (`pip
    install -e ".[track]"`); metrics.jsonl stays the record. With WANDB_MODE=offline the run is kept
    locally to sync later"""
    wandb_project_name: str = "seqrl"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B team or user of --track (default: your W&B default entity)"""
    capture_video: bool = False
    """write video.mp4 of the final evaluation's first episode into the run folder (MuJoCo's
    offscreen renderer; headless machines use MUJOCO_GL=egl, the default here when no display is
    set, or osmesa)"""
    checkpoint: Optional[str] = None
    """a `model.pt` from an earlier run: start from its weights, architecture and state
    normalisation (the architecture flags are ignored); `--updates 0` only evaluates it, on its own
    dataset unless --env says"""
    resume: Optional[str] = None
    """a run folder (runs/RUN) that stopped before its end: continue it there, with its own flags,
    optimizer, schedule and random states, to its --updates; the result is the run it would have
    been without the stop"""
    save_every: int = 0
    """write the resumable checkpoint model.pt every N updates (0: at every evaluation and every 10%
    of the run); also at the end and on Ctrl-C, SIGTERM or SIGUSR1"""
    eval_every: int = 10_000
    """evaluate before training and every N updates (0: only at the end)"""
    log_every: int = 100
    """log the training losses and the learning rate every N updates"""

    def __post_init__(self):
        positive = "context_len n_layer n_head n_embd max_ep_len batch_size lr grad_clip rtg_scale"
        positive += " eval_episodes log_every"
        check_flags(
            self, positive, "seed weight_decay warmup_steps updates eval_every threads save_every"
        )
        if not 0 <= self.dropout < 1:
            raise SystemExit(f"error: --dropout {self.dropout}: must be in [0, 1).")
        if self.context_len > self.max_ep_len:  # K steps cannot outnumber the longest episode
            why = "no episode is longer, and attention's memory grows with K^2"
            raise SystemExit(
                f"error: --context-len {self.context_len}: must be <= --max-ep-len "
                f"{self.max_ep_len} ({why})."
            )
        if self.n_embd % self.n_head:
            raise SystemExit(
                f"error: --n-embd {self.n_embd} must be divisible by --n-head {self.n_head}."
            )
        if self.target_return is not None and not math.isfinite(self.target_return):
            raise SystemExit(
                f"error: --target-return {self.target_return}: pass a finite return, e.g. 3600."
            )
        if self.eval_context is not None and self.eval_context < 1:
            raise SystemExit(f"error: --eval-context {self.eval_context}: must be >= 1 (and <= K).")
        # a warmup longer than the run would end it before it reaches --lr
        if self.updates and self.warmup_steps > self.updates:
            scaled = max(1, self.updates // 10)
            print(
                f"note: --warmup-steps {self.warmup_steps} is longer than --updates "
                f"{self.updates}; warming up over {scaled} updates (a tenth of the run) instead"
            )
            self.warmup_steps = scaled
        if self.updates == 0 and self.checkpoint is None and self.resume is None:
            raise SystemExit(
                "error: --updates 0 trains nothing; add --checkpoint runs/RUN/model.pt to "
                "evaluate one."
            )
        if self.track and importlib.util.find_spec("wandb") is None:
            raise SystemExit(
                'error: --track needs wandb: pip install -e ".[track]" (or leave out --track).'
            )
        # before MuJoCo is imported, which reads it once
        if self.capture_video and not os.environ.get("DISPLAY"):
            os.environ.setdefault("MUJOCO_GL", "egl")
        # Eq. 1.10: a typo must not silently reweight the tasks
        lam = np.asarray(self.lambdas, dtype=float)
        simplex = np.all(np.isfinite(lam) & (lam >= 0)) and abs(lam.sum() - 1) <= 1e-6
        if lam.shape != (len(TASKS),) or not simplex:
            raise SystemExit(
                f"error: --lambdas {' '.join(map(str, self.lambdas))}: need {len(TASKS)} "
                f"non-negative weights summing to 1, one per task ({', '.join(TASKS)})."
            )


# Table 1.3 (official D4RL v2, 10 seeds, 10^5 updates), MO-DT column, printed beside our score.
# fmt: off
THESIS = {"halfcheetah-medium": 43.34, "hopper-medium": 67.45, "walker2d-medium": 78.56,
          "halfcheetah-medium-replay": 40.93, "hopper-medium-replay": 79.43,
          "walker2d-medium-replay": 81.3, "halfcheetah-medium-expert": 94.57,
          "hopper-medium-expert": 111.71, "walker2d-medium-expert": 108.08}
# fmt: on
TARGET_RETURNS = {"hopper": 7200.0, "walker2d": 10000.0, "halfcheetah": 12000.0}  # Table 1.2
MODALITIES = ("rtg", "states", "actions")  # the tokens of a step, in order (Eq. 1.1)
TASKS = ("action", "state", "return")  # the order of lambda_DT, lambda_s, lambda_g (Eq. 1.9)
# The token each head reads: a_t from s_t (Eq. 1.2-1.3: it has seen g_t and s_t, not a_t).
# Eq. 1.5-1.8 write the next-state and next-return heads as "given Gamma_{t-1}"; the inference
# text (Eq. 1.16 predicts g_2 from {g_1, s_1, a_1}) shows they read a_t's token, which has seen
# all of step t and nothing of t+1.
READ = {"action": "states", "state": "actions", "return": "actions"}
ARCH = "gaussian_heads timestep_embedding context_len n_layer n_head n_embd dropout".split()
ARCH += ["max_ep_len", "rtg_scale"]
# Flags that say where and how a run runs, not what it computes: --resume takes them from its own
# command line.
RUN_FLAGS = "resume device threads eval_async runs_dir track wandb_project_name".split()
RUN_FLAGS += ["wandb_entity", "capture_video"]


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """g_t = sum_{t' >= t} r_t', the undiscounted return-to-go of §1.3.1 (Eq. 1.1's g tokens)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


def make_dataset(
    episodes: list[dict], device, rtg_scale: float, max_ep_len: int, state_stats=None
) -> dict:
    """Per-step tensors under `steps` (every one is gathered into a batch) and the episode
    boundaries. `state_stats` (mean, std): a checkpoint's, so that training on and evaluating see
    its state scale."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    mean, std = state_stats if state_stats is not None else (obs.mean(0), obs.std(0) + 1e-6)
    # as saved: a resumed run sees the same
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    lengths = np.array([len(ep["rewards"]) for ep in episodes])
    last = np.cumsum(lengths) - 1  # an episode's last step has no s_{t+1} in the data
    rtg = np.concatenate([returns_to_go(ep["rewards"]) for ep in episodes])[:, None] / rtg_scale
    rewards = np.concatenate([ep["rewards"] for ep in episodes])[:, None] / rtg_scale
    steps = {
        "states": torch.as_tensor((obs - mean) / std, dtype=torch.float32),
        "actions": torch.as_tensor(np.concatenate([ep["actions"] for ep in episodes])),
        "rtg": torch.as_tensor(rtg),
        "timesteps": torch.as_tensor(
            np.concatenate([np.minimum(np.arange(n), max_ep_len - 1) for n in lengths])
        ),
        # Eq. 1.8's target g_{t+1} = g_t - r_t, 0 after the last step
        "next_rtg": torch.as_tensor(rtg - rewards),
        # Eq. 1.7's target s_{t+1} exists
        "has_next": torch.as_tensor(~np.isin(np.arange(len(obs)), last)),
    }
    steps["next_states"] = torch.roll(steps["states"], -1, dims=0) * steps["has_next"][:, None]
    bounds = {
        "ep_start": torch.as_tensor(np.cumsum(lengths) - lengths),
        "ep_len": torch.as_tensor(lengths),
    }
    return {
        "steps": {k: v.to(device) for k, v in steps.items()},
        **{k: v.to(device) for k, v in bounds.items()},
        "state_stats": (mean, std),
    }


def sample_batch(data: dict, batch_size: int, K: int, gen: torch.Generator) -> dict:
    """Segments of K steps: the trajectory is drawn with probability proportional to its length, the
    start uniformly inside it. A segment that runs past the episode's end is left-padded (as in DT)
    so that its last position is always real, like at evaluation; `mask` marks the real positions,
    padding is zeros."""
    ep = torch.multinomial(data["ep_len"].float(), batch_size, replacement=True, generator=gen)
    length = data["ep_len"][ep]
    start = (torch.rand(batch_size, generator=gen, device=length.device) * length).long()
    pad = K - torch.clamp(length - start, max=K)  # the steps past the episode's end
    offset = torch.arange(K, device=length.device) - pad[:, None]  # (B, K)
    mask = offset >= 0
    idx = data["ep_start"][ep, None] + start[:, None] + offset.clamp(min=0)
    batch = {
        k: v[idx] * mask.view(*mask.shape, *[1] * (v.dim() - 1)) for k, v in data["steps"].items()
    }
    return dict(batch, mask=mask)


# --- Model: a GPT over interleaved (g_t, s_t, a_t) tokens (Eq. 1.1); heads of Eq. 1.3, 1.5, 1.6
def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training): in training every entry is zeroed with probability p and the
    others are scaled by 1 / (1 - p). On a CPU the mask is drawn as uniform fp32 numbers (p exact
    under bf16 too), twice as fast as F.dropout's bernoulli_, whose masks took 13% of a DT-size
    update there (benchmarks/results/corl). CUDA's F.dropout is one fused kernel: kept."""
    if not training or not 0 < p < 1 or not own_masks(x):
        return F.dropout(x, p, training)
    keep = torch.rand_like(x, dtype=torch.float32).ge_(p)
    return x * keep.div_(1 - p).to(x.dtype)


def own_masks(x: torch.Tensor) -> bool:
    """Whether dropout() and SelfAttention draw their dropout masks themselves: on a CPU
    (benchmarks/ops.py answers no to count the kernels that a GPU runs)."""
    return x.device.type == "cpu"


class Dropout(nn.Dropout):
    """nn.Dropout through dropout(); otherwise the same module (no weights: checkpoints keep)."""

    def forward(self, x):
        return dropout(x, self.p, self.training)


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = Dropout(dropout)

    def forward(self, x, allowed):
        B, T, C = x.shape
        heads = (z.view(B, T, self.n_head, C // self.n_head) for z in self.qkv(x).split(C, dim=2))
        q, k, v = (z.transpose(1, 2) for z in heads)  # (B, nh, T, hs)
        p = self.dropout * self.training
        if p and own_masks(x):
            # SDPA's math, written out: on a CPU SDPA drops out only through this same math with
            # a bernoulli_ mask; here the mask is dropout()'s
            att = (q @ k.transpose(-2, -1)).mul_(1 / math.sqrt(k.size(-1)))
            att = att.masked_fill_(~allowed, float("-inf")).softmax(-1)
            y = dropout(att, p, True) @ v
        else:  # one fused kernel; it returns no weights (benchmarks/attention.py recomputes them)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 layout, ReLU as in the DT code and Table 1.1)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.ReLU(),
            nn.Linear(4 * n_embd, n_embd),
            Dropout(dropout),
        )

    def forward(self, x, allowed):
        x = x + self.attn(self.ln1(x), allowed)
        return x + self.mlp(self.ln2(x))


def attention_mask(K: int, M: int, mask, device) -> torch.Tensor:
    """Which keys each of the M*K tokens may attend to: itself and everything before it
    (a_t ~ pi(. | Gamma_t), Eq. 1.2), minus padded steps; every token still sees itself, so that no
    row is empty."""
    allowed = torch.ones(M * K, M * K, dtype=torch.bool, device=device).tril()
    if mask is None:
        return allowed
    eye = torch.eye(M * K, dtype=torch.bool, device=device)
    return (allowed & mask.repeat_interleave(M, dim=1)[:, None, None, :]) | eye


def bounded_log_std(x: torch.Tensor) -> torch.Tensor:
    """A head's raw log-std squashed into [-5, 2], ODT's bounds, so the NLL cannot run off on a
    constant target."""
    return -5.0 + 3.5 * (torch.tanh(x) + 1)


class MultiObjectiveDecisionTransformer(nn.Module):
    def __init__(
        self, state_dim, act_dim, gaussian_heads, timestep_embedding, context_len, n_layer, n_head,
        n_embd, dropout, max_ep_len, rtg_scale
    ):  # fmt: skip
        super().__init__()
        self.K, self.max_ep_len, self.rtg_scale = context_len, max_ep_len, rtg_scale
        # One linear embedding per modality, in token order (Eq. 1.1), and no positional embedding
        # (the DT code removes GPT-2's, the ODT code never uses its own); --timestep-embedding adds
        # DT's timestep embedding to every token of a step.
        self.dims = {"rtg": 1, "states": state_dim, "actions": act_dim}
        self.embed = nn.ModuleDict({m: nn.Linear(self.dims[m], n_embd) for m in MODALITIES})
        self.embed_t = nn.Embedding(max_ep_len, n_embd) if timestep_embedding else None
        self.embed_ln, self.drop = nn.LayerNorm(n_embd), Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # The heads are the task-specific parameters theta_DT, theta_s, theta_g of Eq. 1.9; the rest
        # is shared. A Gaussian head gives a mean and a log-std per dimension (Eq. 1.3, 1.5, 1.6).
        # Fig. 1.4a's MSE ablation is on "states and returns" only: the action head stays Gaussian.
        self.gaussian = {"action": True, "state": gaussian_heads, "return": gaussian_heads}
        out = {"action": act_dim, "state": state_dim, "return": 1}
        self.heads = nn.ModuleDict(
            {k: nn.Linear(n_embd, d * (1 + self.gaussian[k])) for k, d in out.items()}
        )

    def forward(self, x: dict) -> dict:
        """x: rtg (B, K, 1), states (B, K, m_s), actions (B, K, m_a), timesteps (B, K) and
        optionally mask (B, K), True on real steps. Returns {task: (mean, log-std or None)}, each
        (B, K, dim)."""
        B, K, M = *x["states"].shape[:2], len(MODALITIES)
        t = 0.0 if self.embed_t is None else self.embed_t(x["timesteps"])
        tokens = torch.stack([self.embed[m](x[m]) + t for m in MODALITIES], dim=2)  # (B, K, M, C)
        h = self.drop(self.embed_ln(tokens.reshape(B, M * K, -1)))  # g_1, s_1, a_1, g_2, ...
        allowed = attention_mask(K, M, x.get("mask"), h.device)
        for block in self.blocks:
            h = block(h, allowed)
        # The heads run in fp32, autocast or not: their outputs are fed back (the actions; MO-DT's
        # returns at evaluation, Eq. 1.16) and enter every NLL. bf16 keeps 8 bits: above a
        # return-to-go of ~500 its spacing exceeds one hopper step's reward. The heads are small;
        # fp32 costs nothing there.
        h, preds = self.ln_f(h).reshape(B, K, M, -1).to(self.ln_f.weight.dtype), {}  # fp32
        with torch.autocast(h.device.type, enabled=False):
            for task, head in self.heads.items():
                out = head(h[:, :, MODALITIES.index(READ[task])])
                mean, log_std = out.chunk(2, dim=-1) if self.gaussian[task] else (out, None)
                # Actions live in [-1, 1]: the action mean is tanh-squashed, as in DT's
                # deterministic head. Where Eq. 1.3 is silent, a Gaussian action head keeps that
                # mean and the plain NLL of Eq. 1.4, without ODT's tanh-transformed distribution and
                # entropy constraint; evaluation acts with the mean.
                mean = torch.tanh(mean) if task == "action" else mean
                preds[task] = (mean, None if log_std is None else bounded_log_std(log_std))
        return preds


def masked_mean(per_step: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over the real positions (the 1/K E[sum_k ...] of Eq. 1.4, padding excluded)."""
    return (per_step * mask).sum() / mask.sum().clamp(min=1)


def head_loss(mean, log_std, target, mask) -> torch.Tensor:
    """Diagonal Gaussian NLL summed over dimensions (Eq. 1.4), or with log_std None DT's l2 loss
    (mean squared error over dimensions); averaged over the real positions, in float32 even under
    autocast."""
    mean, target = mean.float(), target.float()
    if log_std is None:
        return masked_mean(((mean - target) ** 2).mean(-1), mask)
    nll = (
        0.5 * ((target - mean) / log_std.float().exp()) ** 2
        + log_std.float()
        + 0.5 * math.log(2 * math.pi)
    )
    return masked_mean(nll.sum(-1), mask)


def task_losses(preds: dict, batch: dict) -> dict:
    """L_DT, L_s, L_g (Eq. 1.4, 1.7, 1.8) on one batch; the next-state loss skips episode ends."""
    next_mask = batch["mask"] & batch["has_next"]
    targets = {
        "action": ("actions", batch["mask"]),
        "state": ("next_states", next_mask),
        "return": ("next_rtg", batch["mask"]),
    }
    return {task: head_loss(*preds[task], batch[key], m) for task, (key, m) in targets.items()}


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020; Table 1.1, Alg. 1 line 12) as timm's `Lamb`, the ODT code's and so
    the thesis's: bias-corrected Adam moments, the decay added to the Adam update, each tensor's
    step scaled by its trust ratio ||w|| / ||update|| (1 where a norm is 0), uncapped, decayed or
    not (ODT had one group, with decay). Written out: timm pulls torchvision; pytorch-optimizer's
    Lamb has no bias correction and caps ||w|| at 10. timm's clip at 1.0 is left out (--grad-clip
    0.25 comes first). Each line of the math is one multi-tensor op (one GPU launch, not one per
    tensor); no value is read back."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        done = []  # (tensors, their updates, lr) of each group
        for group in self.param_groups:
            (beta1, beta2), step = group["betas"], group.get("step", 0) + 1
            group["step"] = step  # one count per group as in timm, even when a head has no gradient
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in [p for p in ps if not self.state[p]]:  # the moments start at 0
                self.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            grads = [p.grad for p in ps]
            m, v = ([self.state[p][k] for p in ps] for k in ("exp_avg", "exp_avg_sq"))
            torch._foreach_lerp_(m, grads, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(torch._foreach_div(v, 1 - beta2**step))
            torch._foreach_add_(denom, group["eps"])
            update = torch._foreach_div(torch._foreach_div(m, 1 - beta1**step), denom)
            torch._foreach_add_(update, ps, alpha=group["weight_decay"])
            done.append((ps, update, group["lr"]))
        params, updates = [p for ps, _, _ in done for p in ps], [u for _, us, _ in done for u in us]
        if params:  # the trust ratios of all groups at once, kept on the device
            w_norm, u_norm = (torch.stack(torch._foreach_norm(x)) for x in (params, updates))
            trust = torch.where(torch.minimum(w_norm, u_norm) > 0, w_norm / u_norm, 1.0)
            torch._foreach_mul_(updates, trust.unbind())
        for ps, update, lr in done:
            torch._foreach_sub_(ps, update, alpha=lr)


def make_optimizer(model, args):
    """LAMB (Table 1.1), decaying matrices only (as nanoGPT), eps 1e-8 (as ODT), a linear warmup."""
    wd, named = args.weight_decay, [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p.dim() >= 2 and not n.startswith("pos_") for n, p in named]
    groups = [
        {"params": [p for (_, p), d in zip(named, decay) if d == on], "weight_decay": wd * on}
        for on in (1, 0)
    ]
    opt = Lamb(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps))
    )


def update(
    model, opt, batch: dict, lambdas: dict, schedule: str, grad_clip: float, autocast
) -> tuple[dict, torch.Tensor]:
    """One update on one batch. `joint`: one step on sum_i lambda_i L_i (Eq. 1.9, Alg. 1 line 12).
    `alternating`: one step on lambda_i L_i per task in turn, each on a fresh forward pass, so each
    task's gradient is taken where the previous task's step left the weights (Ch. 3 Eq. 3.2-3.3,
    Thm 3); a task with lambda_i = 0 takes no step (LAMB's momentum would still move the weights).
    With LAMB every step has a normalised size, so an alternating update moves the shared weights
    further than a joint one: that is part of the regime. Returns the task losses (under
    `alternating` each just before its own step) and the mean pre-clip gradient norm."""
    measured, norms = {}, []
    for task in [None] if schedule == "joint" else [k for k in TASKS if lambdas[k] > 0]:
        with autocast:
            losses = task_losses(model(batch), batch)
        tasks = TASKS if task is None else (task,)
        loss = sum(lambdas[k] * losses[k] for k in tasks)
        measured |= {k: v.detach() for k, v in losses.items() if task in (None, k)}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True))
        opt.step()
    return measured, torch.stack(norms).mean()


def act(model, context: dict, low, high, autocast) -> tuple[torch.Tensor, dict]:
    """Eq. 1.2 for one env step of every episode: a_t, the action head's mean read off the last s_t
    token of the context Gamma_t (the last <= K steps), within the action bounds [low, high]; and
    all the heads' predictions on the context (trdt.py reads its region head there)."""
    with autocast:
        preds = model(context)
    mean = preds["action"][0][:, -1].float()
    return torch.maximum(torch.minimum(mean, high), low), preds


# --- Evaluation: all episodes at once in a vector env, batched forwards at every environment step.
@dataclass(frozen=True)
class EvalSettings:
    """The evaluation's flags, named as in Args (an Args serves too; see their help there). The
    envs reset from seed + 10000; eval_context None is the model's K."""

    eval_episodes: int
    eval_context: Optional[int] = None
    eval_async: bool = False
    seed: int = 0
    rtg_update: str = "model"

    @classmethod
    def of(cls, args) -> EvalSettings:
        """The same flags of an Args."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@torch.no_grad()
def evaluate(
    model, facts, state_stats, settings, target_return, device, autocast, video=None
) -> dict:  # fmt: skip
    """Roll out settings.eval_episodes episodes conditioned on target_return."""
    n, K = settings.eval_episodes, settings.eval_context or model.K  # K' <= K with --eval-context
    envs, horizon = make_eval_envs(facts, n, settings.eval_async, video)
    bounds = (envs.action_space.low, envs.action_space.high)
    low, high = (torch.as_tensor(b[0], device=device) for b in bounds)
    mean, std = (torch.as_tensor(x, device=device) for x in state_stats)
    buf = {m: torch.zeros(n, horizon, d, device=device) for m, d in model.dims.items()}
    t_max = model.max_ep_len - 1
    buf["timesteps"] = torch.arange(horizon, device=device).clamp(max=t_max).expand(n, -1)
    buf["rtg"][:, 0] = target_return / model.rtg_scale  # g_1
    returns, lengths, done = np.zeros(n), np.zeros(n, dtype=int), np.zeros(n, dtype=bool)
    model.eval()
    obs, _ = envs.reset(seed=settings.seed + 10_000)
    look = dict(unit="episode", leave=False, dynamic_ncols=True, mininterval=1.0)
    bar = tqdm(total=n, desc="evaluate", **look)
    t0 = time.perf_counter()
    for t in range(horizon):
        # Alg. 1 lines 14-25: s_t joins the history, a_t (Eq. 1.15) is executed, g_{t+1} follows
        s_t = torch.as_tensor(obs, device=device, dtype=torch.float32)
        buf["states"][:, t] = (s_t - mean) / std
        ctx = slice(max(0, t - K + 1), t + 1)  # Gamma_t (Eq. 1.2): the last K steps, fewer at first
        context = {k: v[:, ctx] for k, v in buf.items()}
        buf["actions"][:, t], _ = act(model, context, low, high, autocast)
        obs, r, term, trunc, _ = envs.step(buf["actions"][:, t].cpu().numpy())
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        bar.update(int(done.sum()) - bar.n)
        bar.set_postfix(env_steps=int(lengths.sum()), refresh=False)
        if done.all() or t + 1 == horizon:  # no slot for g_{t+1} past the horizon
            break
        if settings.rtg_update == "model":  # Eq. 1.16, Alg. 1 line 23: g_{t+1} from the return head
            with autocast:  # on the a_t token, which exists only now (`context` views buf)
                buf["rtg"][:, t + 1] = model(context)["return"][0][:, -1].float()
        else:
            r = torch.as_tensor(r, device=device, dtype=torch.float32)[:, None]
            buf["rtg"][:, t + 1] = buf["rtg"][:, t] - r / model.rtg_scale  # g_{t+1} = g_t - r_t
    wait_for(device)  # env steps/s of work done, not of work queued on the device
    elapsed = time.perf_counter() - t0
    bar.close()
    envs.close()
    model.train()
    return common.episode_scores(facts, returns, lengths, elapsed)


# --- Training (Alg. 1): segments of K steps, one gradient step each, evaluations along the way.
def train(args: Args) -> dict:
    """Fit the three heads on sum_i lambda_i L_i (Eq. 1.9), evaluating before the first update,
    every --eval-every updates and at the end. A stopped run resumes where it stopped."""
    run = open_run(args)  # flags, seeds, device, checkpoint, dataset, run folder, config.json
    args, device, facts, autocast = run["args"], run["device"], run["facts"], run["autocast"]
    model = MultiObjectiveDecisionTransformer(**run["arch"]).to(device)
    fresh = None if args.resume else run["dir"]  # removed if the checkpoint's weights do not fit
    stats = load_weights(model, run["ckpt"], fresh)  # a checkpoint's, with its state scale
    announce(run, model)
    settings = EvalSettings.of(args)

    def run_eval(step: int, video: Optional[str] = None) -> dict:
        target = run["target_return"]
        res = evaluate(model, facts, stats, settings, target, device, autocast, video=video)
        log_score(run, step, res)
        return res

    with stops_reported(run):  # Ctrl-C, SIGTERM, SIGUSR1: save, and say how to go on
        if args.updates:
            arch = run["arch"]
            scales = (arch["rtg_scale"], arch["max_ep_len"])
            data = make_dataset(run["episodes"], device, *scales, stats)
            stats = data["state_stats"]
            opt, sched = make_optimizer(model, args)
            gen = torch.Generator(device=device).manual_seed(args.seed)
            update_fn, fwd = compiled_update(model, opt, device, args.compile)
            lambdas = dict(zip(TASKS, args.lambdas))

            def step():  # Alg. 1: a batch of segments, one update
                batch = sample_batch(data, args.batch_size, arch["context_len"], gen)
                lr = sched.get_last_lr()[0]  # the rate this update uses
                how = (lambdas, args.schedule, args.grad_clip)
                losses, grad_norm = update_fn(fwd, opt, batch, *how, autocast)
                sched.step()  # warmup counts updates: one curve for both schedules
                return losses, grad_norm, lr

            fit(step, opt, sched, gen, model, checkpoint_frame(run, stats), run, run_eval)
        video = str(run["dir"] / "video.mp4") if args.capture_video else None
        res = run_eval(run["done"], video=video)
    return finish(run, res)


# --- PLUMBING: run infrastructure, the same in every method file ----------------------------------


def check_flags(args, positive: str, non_negative: str) -> None:
    """PLUMBING: one message per bad flag, naming it and its value (NaN fails both tests)."""
    for names, ok, rule in (
        (positive, lambda v: v > 0, "> 0"),
        (non_negative, lambda v: v >= 0, ">= 0"),
    ):
        for name in names.split():
            if not ok(getattr(args, name)):
                raise SystemExit(
                    f"error: --{name.replace('_', '-')} {getattr(args, name)}: must be {rule}."
                )


def setup(args) -> tuple[torch.device, int]:
    """PLUMBING: threads, seeds and the device, checked before anything is written."""
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    threads = args.threads or max(1, cores // 2)
    torch.set_num_threads(threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(auto if args.device == "auto" else args.device)
    except RuntimeError:
        raise SystemExit(
            f"error: --device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"error: --device {args.device}: this torch sees no CUDA GPU; use --device cpu "
            "(or auto)."
        )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, threads


def bf16_native(device: torch.device) -> bool:
    """PLUMBING: a GPU that computes bf16 natively (compute capability 8.0+), or a CPU with
    AVX512-BF16 or AMX; elsewhere bf16 is emulated, slower than fp32. SEQRL_TEST_FORCE_BF16=1 (the
    test suite's second pass, .ci/run) takes the bf16 path on any CPU, emulated, so that CI runs the
    code every GPU and bf16 CPU runs."""
    if os.environ.get("SEQRL_TEST_FORCE_BF16") == "1":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def fit_weights(model: nn.Module, weights: dict, fresh_run: Optional[Path] = None) -> None:
    """PLUMBING: a checkpoint's weights into the model its `arch` describes; weights that do not fit
    it (an edited or foreign file) are one line, not load_state_dict's traceback, and the run folder
    made for them (`fresh_run`, holding only its config.json) is removed."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        if fresh_run is not None and {f.name for f in fresh_run.iterdir()} <= {"config.json"}:
            (fresh_run / "config.json").unlink(missing_ok=True)
            fresh_run.rmdir()
        raise SystemExit(
            "error: the checkpoint's weights do not fit the architecture it records "
            f"({why[:160]}); pass a model.pt this script wrote, unedited."
        ) from None


def load_checkpoint(path: Optional[str], device, flag: str = "--checkpoint") -> Optional[dict]:
    """PLUMBING: a model.pt this script wrote, read as data only (weights_only: loading cannot run
    code), onto `device` whatever device wrote it."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise SystemExit(f"error: {flag} {path}: no such file (expected runs/RUN/model.pt).")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        why = f"not a checkpoint torch can read as data ({type(e).__name__})"
        why += f"; pass a model.pt that {METHOD}.py wrote"
        raise SystemExit(f"error: {flag} {path}: {why}.") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD:
        found = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise SystemExit(
            f"error: {flag} {path} was written by {found or 'another program'}, not {METHOD}.py."
        )
    if flag == "--resume" and ckpt.get("resume") is None:
        raise SystemExit(
            f"error: --resume: {path} holds no training state (an older version's); "
            "use --checkpoint."
        )
    return ckpt


def load_data(args, ckpt: Optional[dict]) -> tuple[Optional[list], dict]:
    """PLUMBING: the dataset of --env / --dataset-path, else the checkpoint's. Evaluating a
    checkpoint on its own dataset needs only the recorded dataset facts, not the file; another
    domain's data is refused."""
    recorded = ckpt["dataset"] if ckpt is not None else None
    if recorded is not None and args.env is None and not args.dataset_path and args.updates == 0:
        return None, recorded
    name = args.env or (recorded["name"] if recorded is not None else DEFAULT_ENV)
    paths = args.dataset_path or (
        tuple(recorded["path"] or ()) if recorded is not None and args.env is None else ()
    )
    try:
        episodes, info = common.load_dataset(name, paths)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    facts = ("env_id", "obs_dim", "act_dim")
    if recorded is not None and any(recorded[k] != info[k] for k in facts):
        raise SystemExit(
            f"error: --checkpoint {args.checkpoint} was trained on {recorded['name']} "
            f"({recorded['env_id']}), not on data of {info['env_id']} like {name}; leave out "
            "--env to use its own dataset."
        )
    return episodes, info


def make_run_dir(args, info: dict) -> Path:
    """PLUMBING: runs/{env}__{exp_name}__{seed}__{time} (exp_name-eval when it only evaluates); an
    existing folder is never reused."""
    # `ls runs` tells evaluations apart
    kind = args.exp_name if args.updates else f"{args.exp_name}-eval"
    name = f"{info['name'].replace('/', '_')}__{kind}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.runs_dir) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise SystemExit(
            f"error: run folder {run_dir} already exists; wait a second or change --exp-name."
        ) from None
    except OSError as e:
        raise SystemExit(
            f"error: --runs-dir {args.runs_dir}: cannot make a run folder there ({e.strerror})."
        ) from None
    return run_dir


def log_metrics(path: Path, **metrics) -> None:
    """PLUMBING: one JSON line, appended and closed at once, so a killed run keeps every line it
    logged; also to W&B once --track has started a run there."""
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.log(metrics, step=metrics.get("step"))


def start_tracking(args, config: dict, run_dir: Path) -> None:
    """PLUMBING: --track: a W&B run named like the run folder, with the full config (CleanRL's
    convention)."""
    if args.track:
        import wandb

        project, entity = args.wandb_project_name, args.wandb_entity
        wandb.init(project=project, entity=entity, config=config, name=run_dir.name, dir=run_dir)


def finish_tracking(results: dict) -> None:
    """PLUMBING: --track: the final numbers become the W&B run's summary."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.summary.update({k: v for k, v in results.items() if isinstance(v, (int, float))})
        wandb.finish()


def git_commit() -> Optional[str]:
    """PLUMBING"""
    try:
        git = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True
        )
        return git.stdout.decode().strip() if git.returncode == 0 else None
    except Exception:
        return None


# PLUMBING: a signal's name -> what it is
STOP_SIGNALS = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM", "SIGUSR1": "SIGUSR1"}


# PLUMBING: the state of signals_deferred and catch_stop_signals
STOPPING = {"deferred": False, "pending": None, "stopped": False}


def catch_stop_signals() -> dict:
    """PLUMBING: Ctrl-C, SIGTERM (`timeout`, SLURM and Kubernetes before a kill) and SIGUSR1
    (SLURM's --signal) all raise KeyboardInterrupt naming the signal, so that one `except` saves a
    resumable checkpoint for each. Returns the handlers it replaced (restore_signals puts them
    back); only the main thread can catch signals."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    STOPPING["stopped"] = False

    def stop(signum, frame):
        # One stop is enough: a second copy (benchmarks/run.py passes on what may also have reached
        # the whole process group; a second Ctrl-C) must not break into the checkpoint being saved.
        if STOPPING["stopped"]:
            return
        STOPPING["stopped"] = True
        why = STOP_SIGNALS[signal.Signals(signum).name]
        if STOPPING["deferred"]:
            STOPPING["pending"] = why
            return
        raise KeyboardInterrupt(why)

    names = [n for n in STOP_SIGNALS if hasattr(signal, n)]  # no SIGUSR1 on Windows
    return {getattr(signal, n): signal.signal(getattr(signal, n), stop) for n in names}


def restore_signals(old: dict) -> None:
    """PLUMBING"""
    for signum, handler in old.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def signals_deferred():
    """PLUMBING: a stop signal that arrives inside the block takes effect when it ends, so that an
    update or a checkpoint is never left half done."""
    STOPPING["deferred"] = True
    try:
        yield
    finally:
        STOPPING["deferred"] = False
        why, STOPPING["pending"] = STOPPING["pending"], None
        if why is not None:
            raise KeyboardInterrupt(why)


def save_atomic(obj: dict, path: Path) -> None:
    """PLUMBING: written to a temporary file, flushed to disk, then renamed over `path` (atomic on
    POSIX and Windows): a kill at any instant leaves the last complete checkpoint readable."""
    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def training_state(
    updates_done: int, opt, sched, gen: torch.Generator, clock: dict, metrics: Path
) -> dict:
    """PLUMBING: what an exact resume needs besides the weights: the optimizer's moments, the
    schedule's position, every random state (python, numpy, torch, CUDA, the batch sampler's), the
    updates done, the time spent and how many lines metrics.jsonl had."""
    kind, key, pos, gauss, cached = np.random.get_state()
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(), "batch": gen.get_state()}
    key = torch.as_tensor(key.astype(np.int64))  # as data: no numpy pickles
    rng["numpy"] = (kind, key, pos, gauss, cached)
    rng["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng["batch_device"] = gen.device.type
    sched_state = sched.state_dict() if sched is not None else None
    state = {
        "updates_done": updates_done,
        "optimizer": opt.state_dict(),
        "scheduler": sched_state,
        "rng": rng,
    }
    lines = metrics.read_text().count("\n") if metrics.exists() else 0
    return state | {"clock": dict(clock), "metrics_lines": lines}


def restore_training_state(state: dict, opt, sched, gen: torch.Generator) -> None:
    """PLUMBING: the inverse of training_state. The batch sampler's state belongs to one kind of
    device: resumed on another, the sampler goes on from a fresh stream (said once; the run is then
    not bit-exact)."""
    opt.load_state_dict(state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    kind, key, pos, gauss, cached = rng["numpy"]
    np.random.set_state((kind, key.cpu().numpy().astype(np.uint32), pos, gauss, cached))
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    if rng["batch_device"] == gen.device.type:
        gen.set_state(rng["batch"].cpu())
    else:
        gen.manual_seed(int(torch.randint(2**62, (1,)).item()))
        print(
            f"resumed on {gen.device.type}, saved on {rng['batch_device']}: a fresh batch "
            "stream (not bit-exact)"
        )


def resumed_args(cls, cli):
    """PLUMBING: --resume RUN: that run's own flags from its config.json. This command's run flags
    (RUN_FLAGS: where and how to run, not what) replace them; any other flag given is refused rather
    than ignored."""
    if cli.resume is None:
        return cli
    run = Path(cli.resume)
    if (run / "results.json").exists():
        raise SystemExit(
            f"error: --resume {run}: that run has finished (results.json is there); "
            "nothing to resume."
        )
    try:
        saved = json.loads((run / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SystemExit(
            f"error: --resume {run}: no run of {METHOD}.py there (no readable config.json)."
        ) from None
    if not (run / "model.pt").is_file():
        raise SystemExit(
            f"error: --resume {run}: no model.pt there yet (stopped before its first save); "
            "start again."
        )
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
    for name, value in dataclasses.asdict(cli).items():
        given = value != fields[name] and value != saved.get(name, fields[name])
        if name not in RUN_FLAGS and given:
            flag = f"--{name.replace('_', '-')}"
            raise SystemExit(
                f"error: --resume {run} continues that run with its own flags; leave out "
                f"{flag} {value} (the run has {saved.get(name, fields[name])})."
            )
    return cls(**(saved | {k: getattr(cli, k) for k in RUN_FLAGS}))


def trim_metrics(path: Path, n_lines: int) -> list[dict]:
    """PLUMBING: on --resume, keep the first n_lines of metrics.jsonl (those logged when the
    checkpoint was saved) and drop the rest, so that no step is written twice; returns the kept
    lines."""
    kept = path.read_text().splitlines()[:n_lines] if path.exists() else []
    path.write_text("".join(line + "\n" for line in kept))
    return [json.loads(line) for line in kept]


def save_due(n: int, updates: int, eval_every: int, save_every: int) -> bool:
    """PLUMBING: --save-every N, or by default at every evaluation and at least every 10% of the
    run."""
    if n == updates:
        return True
    if save_every:
        return n % save_every == 0
    return bool(eval_every and n % eval_every == 0) or n % max(1, math.ceil(updates / 10)) == 0


def log_task_losses(path: Path, step: int, losses: dict, lambdas: dict, grad_norm, lr: float, bar):
    """One update's task losses, their weighted sum (Eq. 1.9), its gradient norm before clipping and
    its learning rate."""
    loss = {f"loss_{k}": v.item() for k, v in losses.items()}
    loss["loss"] = sum(lambdas[k] * loss[f"loss_{k}"] for k in losses)
    log_metrics(path, step=step, grad_norm=grad_norm.item(), lr=lr, **loss)
    bar.set_postfix(loss=f"{loss['loss']:.4f}")


def stop_message(why: str, done: int, run_dir: Path) -> str:
    """PLUMBING: what a stopped run says: where it is, and the one command that continues it."""
    return (
        f"interrupted ({why}): {run_dir / 'model.pt'} holds {done} updates; continue with "
        f"`python {METHOD}.py --resume {run_dir}`, or evaluate it with "
        f"`python {METHOD}.py --checkpoint {run_dir / 'model.pt'} --updates 0`."
    )


def record_config(run_dir: Path, config: dict, resume: Optional[dict]) -> dict:
    """PLUMBING: config.json of a new run; a resumed run keeps its own and adds where and when it
    went on."""
    if resume is not None:
        where = {k: config[k] for k in ("device", "threads", "git_commit", "torch")}
        config = json.loads((run_dir / "config.json").read_text())
        config["resumed"] = config.get("resumed", []) + [
            {"at_update": resume["updates_done"], **where}
        ]
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    return config


def make_eval_envs(info: dict, n: int, asynchronous: bool, video: Optional[str] = None):
    """PLUMBING: n copies of the dataset's env in one vector env (the first one filmed when `video`
    names an MP4), and the episode horizon (the TimeLimit)."""
    import gymnasium as gym

    vector_env = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    envs = vector_env(
        [functools.partial(common.make_env, info, video if i == 0 else None) for i in range(n)]
    )
    probe = common.make_env(info)
    horizon = probe.spec.max_episode_steps or 1000
    probe.close()
    return envs, horizon


# --compile: the updates of each process whose time is compile time, not training time (the first
# compiles; CUDA graphs are recorded after a warmup run)
COMPILE_WARMUP = 3


def wait_for(device: torch.device) -> None:
    """PLUMBING: waits until the device has done the work queued on it (CUDA runs it
    asynchronously), so that a time read afterwards includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Stopwatch:
    """PLUMBING: training time, measured in intervals that end where the run waits for the device
    anyway (a logging point, a save, the end): one sync per interval, never one per update. The
    first `warmup` updates of this process (--compile) are compile time, neither training time nor
    timed updates. Saves and log lines fall between intervals."""

    clock: dict
    device: torch.device
    warmup: int = 0
    started: Optional[float] = None
    updates: int = 0

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def lap(self) -> None:
        """One update done; the last update of the warmup ends its interval."""
        self.updates += 1
        if self.warmup and self.updates == self.warmup:
            self.stop()

    def stop(self) -> None:
        if self.started is None:
            return
        wait_for(self.device)
        seconds = time.perf_counter() - self.started
        if self.warmup:
            self.clock["compile_time_s"] += seconds
            self.warmup -= self.updates
        else:
            self.clock["train_time_s"] += seconds
            self.clock["timed_updates"] += self.updates
        self.started, self.updates = None, 0


def compiled_update(model, opt, device: torch.device, compile: bool):
    """PLUMBING: `update` and the model to pass it; with --compile, compiled. On CUDA the whole
    update (forward, backward, clipping), replayed as CUDA graphs (mode reduce-overhead:
    sample_batch's shapes never change), which cuts the kernel launches that bound a small model's
    step. The optimizer step runs as it is: AdamW's is one fused kernel, which torch.compile never
    traces; LAMB's is about 30 multi-tensor ops, and traced, its learning rate and step count, new
    at every update, would recompile it at every update. On a CPU, where launches cost little, the
    model alone."""
    if not compile:
        return update, model
    if device.type != "cuda":
        return update, torch.compile(model)
    opt.step = torch.compiler.disable(opt.step)  # eager inside the compiled update (see above)
    graphed = torch.compile(update, mode="reduce-overhead")

    def step(*args):
        # a new step: the last one's outputs (read at its logging point) may now be overwritten
        torch.compiler.cudagraph_mark_step_begin()
        return graphed(*args)

    return step, model


def run_timing(clock: dict, compiled: bool, bf16: bool, t_start: float) -> dict:
    """PLUMBING: results.json's timing: updates/s of the timed updates (training only: no compile,
    saves or evaluation), the compile time apart, the run's wall time (a resumed run's in all)."""
    timed, seconds = clock["timed_updates"], clock["train_time_s"]
    timing = {"train_updates_per_s": timed / seconds if timed and seconds else None, "bf16": bf16}
    timing["compile_time_s"] = clock["compile_time_s"] if compiled else None
    timing["wall_time_s"] = clock["wall_time_s"] + time.time() - t_start
    return timing


# The run of train(): its inputs, folder and config, the loop with evaluations, checkpoints and
# exact resume, stop signals and the results.
def read_inputs(args: Args, device):
    """The checkpoint (--resume's or --checkpoint's), the training state it holds, the dataset, the
    architecture and the target return, every one checked."""
    if args.resume:
        ckpt = load_checkpoint(str(Path(args.resume) / "model.pt"), device, "--resume")
    else:
        ckpt = load_checkpoint(args.checkpoint, device)
    episodes, facts = load_data(args, ckpt)
    dims = {"state_dim": facts["obs_dim"], "act_dim": facts["act_dim"]}
    arch = ckpt["arch"] if ckpt is not None else {**{k: getattr(args, k) for k in ARCH}, **dims}
    defaults = {f.name: f.default for f in dataclasses.fields(Args)}
    ignored = [k for k in ARCH if ckpt is not None and defaults[k] != getattr(args, k) != arch[k]]
    if ignored:  # the checkpoint's architecture wins: said, not silent
        told = ", ".join(
            f"--{k.replace('_', '-')} {getattr(args, k)} (it has {arch[k]})" for k in ignored
        )
        print(f"note: the checkpoint sets the architecture; ignoring {told}")
    domain = facts["env_id"].split("-")[0].lower()
    target = args.target_return if args.target_return is not None else TARGET_RETURNS.get(domain)
    if target is None:
        why = f"no default target return for {facts['env_id']}"
        raise SystemExit(f"error: {why}; pass --target-return.")
    if args.eval_context is not None and args.eval_context > arch["context_len"]:
        k = arch["context_len"]
        why = "the checkpoint's context" if ckpt is not None else "--context-len"
        raise SystemExit(
            f"error: --eval-context {args.eval_context}: must be <= K = {k} ({why}); "
            "or leave it out."
        )
    if args.capture_video:
        try:
            common.check_video(facts)
        except common.DatasetError as e:
            raise SystemExit(f"error: {e}") from None
    check_memory(args, arch, device)  # before the run folder is made
    return ckpt, (ckpt["resume"] if args.resume else None), episodes, facts, arch, target


def check_memory(args: Args, arch: dict, device) -> None:
    """--batch-size and --eval-episodes against the memory they need (common.check_memory: the
    estimate, its measured constants and its margin)."""
    bf16 = args.bf16 and bf16_native(device)
    tokens = len(MODALITIES) * arch["context_len"]
    model = (arch["n_embd"], arch["n_layer"], arch["n_head"])
    if args.updates:
        need = common.transformer_bytes(args.batch_size, tokens, *model, bf16=bf16, device=device)
        common.check_memory("--batch-size", args.batch_size, need, device, "a training update")
    n = args.eval_episodes
    need = common.transformer_bytes(n, tokens, *model, bf16=bf16, train=False, device=device)
    need += common.eval_env_bytes(n, args.eval_async)
    common.check_memory("--eval-episodes", n, need, device, "an evaluation")


def start_run(args, device, threads: int, facts, arch, ckpt, resume, target_return):
    """The run folder (a resumed run's own; `-eval` when nothing trains) and its config.json."""
    run_dir = Path(args.resume) if args.resume else make_run_dir(args, facts)
    config = {"method": METHOD, "args": asdict(args), "arch": arch, "dataset": facts}
    config |= {"target_return": target_return, "device": str(device), "threads": threads}
    config |= {"git_commit": git_commit(), "torch": torch.__version__}
    # the flags the evaluated model was trained with: a checkpoint's when this run only evaluates it
    config["trained_with"] = ckpt["args"] if ckpt is not None and not args.updates else asdict(args)
    config = record_config(run_dir, config, resume)
    start_tracking(args, config, run_dir)
    return run_dir, config


def open_run(args: Args) -> dict:
    """What a run starts from, every input checked before its folder is made: the flags (a resumed
    run's own), seeds and device, checkpoint, dataset and target return; then the run folder,
    config.json and --track; the updates done and the clocks (a resumed run's)."""
    t_start = time.time()
    args = resumed_args(Args, args)
    device, threads = setup(args)
    ckpt, resume, episodes, facts, arch, target = read_inputs(args, device)
    run_dir, config = start_run(args, device, threads, facts, arch, ckpt, resume, target)
    bf16 = args.bf16 and bf16_native(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    done = resume["updates_done"] if resume else 0
    parent = ckpt["trained_updates"] - done if ckpt is not None else 0  # the start model's updates
    clock = {"train_time_s": 0.0, "wall_time_s": 0.0, "timed_updates": done, "compile_time_s": 0.0}
    clock |= resume["clock"] if resume else {}  # an older run's clock: all its updates were timed
    inputs = {"args": args, "device": device, "threads": threads, "ckpt": ckpt, "resume": resume}
    inputs |= {"episodes": episodes, "facts": facts, "arch": arch, "target_return": target}
    inputs |= {"config": config, "bf16": bf16, "autocast": autocast}
    run = {"dir": run_dir, "metrics": run_dir / "metrics.jsonl", "t_start": t_start}
    return run | inputs | {"done": done, "parent": parent, "clock": clock}


def load_weights(model, ckpt: Optional[dict], fresh_run: Optional[Path] = None):
    """A checkpoint's weights, and its state normalisation (None without a checkpoint)."""
    if ckpt is None:
        return None
    fit_weights(model, ckpt["model"], fresh_run)
    return tuple(np.asarray(ckpt[k].cpu()) for k in ("state_mean", "state_std"))


def announce(run: dict, model) -> None:
    """The run's first line: where, on what data, how big, on what device and precision."""
    facts, n_params = run["facts"], sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"run {run['dir'].name}: {facts['name']} ({facts['source']} data), {n_params:.2f}M "
        f"parameters, device {run['device']}, {run['threads']} CPU thread(s), "
        f"{'bf16' if run['bf16'] else 'fp32'}"
    )


def log_score(run: dict, step: int, res: dict) -> None:
    """An evaluation's score: a metrics line and a printed one."""
    mean, std = res["normalized_mean"], res["normalized_std"]
    score = {"eval_return": res["return_mean"], "eval_normalized": mean}
    if "region_accuracy" in res:  # trdt.py: how often the region head names the region taken
        score["eval_region_accuracy"] = res["region_accuracy"]
    log_metrics(run["metrics"], step=step, eval_normalized_std=std, **score)
    tqdm.write(f"update {step}: normalized score {mean:.1f} ± {std:.1f}")


def checkpoint_frame(run: dict, state_stats) -> dict:
    """What every model.pt of a run holds besides the weights: what evaluating them needs
    (architecture, dataset facts, state normalisation) and the flags."""
    stats = {
        "state_mean": torch.as_tensor(state_stats[0]),
        "state_std": torch.as_tensor(state_stats[1]),
    }
    parts = {"method": METHOD, "arch": run["arch"], "args": asdict(run["args"])}
    return parts | {"dataset": run["facts"]} | stats


def make_checkpoint(model, frame: dict, total: int, state: dict) -> dict:
    """model.pt: the weights, the updates they have had, and the state --resume continues from."""
    return {"model": model.state_dict(), **frame, "trained_updates": total, "resume": state}


def fit(step, opt, sched, gen, model, frame: dict, run: dict, run_eval) -> None:
    """`step()` (one batch and update; it returns the losses, the gradient norm and the learning
    rate) from the updates done to --updates. An update and its log line run whole before a stop
    signal takes effect; then the evaluation and the checkpoint, when due. A stop saves a
    resumable checkpoint and exits with the command that continues. Training time is measured in
    intervals that end at the log points, evaluations and saves (Stopwatch)."""
    args, clock, resume, metrics = run["args"], run["clock"], run["resume"], run["metrics"]
    fresh = None if resume else run["dir"]  # removed if memory runs out before it logs
    if resume:
        restore_training_state(resume, opt, sched, gen)
    timer = Stopwatch(clock, run["device"], COMPILE_WARMUP if args.compile else 0)

    def save(n: int) -> None:
        timer.stop()  # the interval ends first: the checkpoint's clock holds it
        wall = {"wall_time_s": clock["wall_time_s"] + time.time() - run["t_start"]}
        state = training_state(n, opt, sched, gen, clock | wall, metrics)
        ckpt = make_checkpoint(model, frame, run["parent"] + n, state)
        save_atomic(ckpt, run["dir"] / "model.pt")

    logged = trim_metrics(metrics, resume["metrics_lines"]) if resume else []
    evaluated = {m["step"] for m in logged if "eval_normalized" in m}
    every = args.eval_every
    eval_due = lambda n: every and n % every == 0 and n < args.updates  # noqa: E731
    done, total = run["done"], args.updates
    bar = tqdm(range(done, total), "train", total, initial=done, dynamic_ncols=True, mininterval=1)
    try:
        if eval_due(done) and done not in evaluated:
            run_eval(done)
        for n in bar:
            with signals_deferred():  # a stop signal waits for the update and its log line
                timer.start()
                oom = ("--batch-size", args.batch_size, run["device"], "a training update", fresh)
                with common.out_of_memory(*oom):
                    losses, grad_norm, lr = step()
                run["done"] = done = n + 1
                timer.lap()
                if n % args.log_every == 0 or done == total:
                    timer.stop()  # waits for the device, as the log line's .item() would
                    lambdas = dict(zip(TASKS, args.lambdas))
                    log_task_losses(metrics, n, losses, lambdas, grad_norm, lr, bar)
            if eval_due(done):
                timer.stop()
                run_eval(done)
            if save_due(done, total, args.eval_every, args.save_every):
                save(done)
    except KeyboardInterrupt as stop:
        save(done)
        why = str(stop) or "Ctrl-C"
        raise SystemExit(stop_message(why, run["parent"] + done, run["dir"])) from None


@contextlib.contextmanager
def stops_reported(run: dict):
    """Stop signals raise KeyboardInterrupt inside (catch_stop_signals). fit saves and reports a
    stop in training; one in an evaluation-only run or in the final evaluation (the model is saved
    by then) ends here, in one line. The handlers are put back in any case."""
    old_handlers = catch_stop_signals()
    n, fresh = run["args"].eval_episodes, None if run["args"].resume else run["dir"]
    try:
        with common.out_of_memory("--eval-episodes", n, run["device"], "an evaluation", fresh):
            yield
    except KeyboardInterrupt as stop:
        why, kept = str(stop) or "Ctrl-C", f"{run['dir']} keeps what it logged"
        raise SystemExit(f"interrupted ({why}) during the evaluation; {kept}.") from None
    finally:
        restore_signals(old_handlers)


def finish(run: dict, res: dict) -> dict:
    """results.json (as if the run had never stopped), W&B's summary and the closing lines."""
    args, facts, clock, done = run["args"], run["facts"], run["clock"], run["done"]
    total = run["parent"] + done
    speed = run_timing(clock, args.compile, run["bf16"], run["t_start"])
    counts = {"updates": done, "trained_updates": total, "run_dir": str(run["dir"])}
    results = {**run["config"], **res, **counts, **speed}
    (run["dir"] / "results.json").write_text(json.dumps(results, indent=2))
    finish_tracking(results)
    label = common.SOURCE_LABEL[facts["source"]]
    column = "MO-DT"
    thesis = THESIS.get(facts["name"], "no number for this dataset")
    print(
        f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over "
        f"{args.eval_episodes} episodes ({label} data, {total} updates); thesis Table 1.3 "
        f"({column}, official D4RL, 10^5 updates): {thesis}"
    )
    print(f"results: {run['dir'] / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
