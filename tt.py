"""Trajectory Transformer (Janner, Li & Levine 2021, "Offline RL as One Big Sequence Modeling
Problem"; blog §5.b): a GPT over trajectories discretized dimension by dimension, used as world
model and policy by beam search.

    python tt.py --env hopper-medium-replay       # the TT code's configuration for that dataset
    python tt.py --env hopper-medium-replay --dataset-path FILE   # any D4RL-layout .hdf5 or DT .pkl
    python tt.py --checkpoint runs/RUN/model.pt --updates 0 --beam-width 1   # evaluate, greedy
    python tt.py --resume runs/RUN   # continue a run stopped by Ctrl-C, SIGTERM or SIGUSR1, exactly

What the defaults cost: the TT code's budget (195k-312k updates at 4 layers, 128 wide, batch 256)
and its planner (beam 128 x horizon 15, about 230 forward passes per env step) are unmeasured on a
GPU; on a 2-core CPU training is 17-26 s per update (40-60 days) and planning 25-37 s per env step
(hours per episode). For a first look, the CPU preset below.

CPU preset (about 15 minutes of training on 2 free cores; add --env and --dataset-path as above):
    python tt.py --n-embd 64 --batch-size 32 --seq-len 5 --updates 3000 --warmup-epochs 0.1 \\
        --horizon 5 --beam-width 8

Settings no flag gives (updates, beam width, horizon, action filters, context) are the TT code's
for the dataset (config/offline.py: its per-dataset entry, else its base); the run banner and
results.json name each one's source. Training may use bf16 (--bf16, where native); planning runs
in fp32 like the TT code (--plan-bf16 to change that).

One file, in reading order: the method's flags, data (discretizer, tokens), model, loss and
update, planning (beam search), evaluation, training; below the PLUMBING banner, the run's
infrastructure. Blocks marked PLUMBING are dt.py's, byte for byte. Shared with the other method
files is only common.py (datasets, env ids, normalized scores).
"""

# ruff: noqa: UP045, BLE001  (the PLUMBING blocks are dt.py's, byte for byte)
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch import nn
from tqdm import tqdm

import common

METHOD = "tt"
DEFAULT_ENV = "hopper-medium-replay"  # the dataset without --env or --checkpoint


@dataclass
class Args:
    # --- the method: architecture (tokens and the GPT over them)
    n_bins: int = 100
    """N, bins per dimension, at least 2 (TT code: 100)"""
    discretizer: Literal["quantile", "uniform"] = "quantile"
    """`quantile`: equal-mass bins per dimension (TT code's default); `uniform`: equal-width bins"""
    seq_len: int = 10
    """K, transitions per training window (TT code: 10); the model's block is
    K * (m_s + m_a + 2) - 1 tokens"""
    n_layer: int = 4
    """transformer blocks (TT code: 4)"""
    n_head: int = 4
    """attention heads per block (TT code: 4)"""
    n_embd: int = 128
    """embedding size (TT code: 32 per head x 4 heads)"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches (TT code: 0.1 each)"""
    # loss: the reward and value tokens' targets and each kind of token's weight
    discount: float = 0.99
    """gamma of the value targets and of the beam-search score (TT code: 0.99)"""
    terminal_penalty: float = -100.0
    """replaces the reward of a step that ends in a real terminal, not a timeout (TT code: -100)"""
    action_weight: float = 5.0
    """cross-entropy weight of action tokens; observation tokens weigh 1 (TT code: 5)"""
    reward_weight: float = 1.0
    """cross-entropy weight of reward tokens (TT code: 1)"""
    value_weight: float = 1.0
    """cross-entropy weight of value tokens (TT code: 1)"""
    # optimizer
    batch_size: int = 256
    """windows per update (TT code: 256)"""
    lr: float = 6e-4
    """AdamW peak learning rate (TT code: 6e-4, betas 0.9/0.95, weight decay 0.1 on matrices)"""
    warmup_epochs: float = 1.0
    """linear warmup in epochs; an epoch = (window starts in the data) / batch size updates
    (TT code: 1)"""
    decay_epochs: float = 20.0
    """epochs at which the cosine reaches its floor, 10% of --lr (TT code: 20); see --lr-schedule
    for after"""
    lr_schedule: Literal["tt", "clamped"] = "tt"
    """`tt`: the TT code's schedule: the first update at --lr (the rate is set after each update),
    then a linear warmup, then 0.5 (1 + cos(pi p)) floored at 10%, with the progress p not clamped
    at 1, so after --decay-epochs the rate climbs back to the peak (at epoch 2 x decay - warmup, 39)
    and keeps cycling (period 2 x (decay - warmup) epochs); `clamped`: ours before, the same warmup
    shifted by one update and the rate held at 10% after --decay-epochs"""
    n_epochs_ref: Optional[int] = None
    """epochs for a dataset of 10^6 windows, the TT code's measure of the training budget (see
    --updates). Default: TT code's 50, 80 on hopper-medium-replay and walker2d-medium-replay"""
    updates: Optional[int] = None
    """gradient updates; with --checkpoint, 0 only evaluates. Default: the TT code's rule for W
    windows in the data, int(10^6 / W x --n-epochs-ref) epochs of ceil(W / --batch-size) updates
    (about 195k; 312.5k on hopper-medium-replay and walker2d-medium-replay)"""
    grad_clip: float = 1.0
    """clip the global gradient norm at this value (TT code: 1.0)"""
    # data
    env: Optional[str] = None
    """dataset: a D4RL gym-mujoco name such as `hopper-medium-replay` (with or without `-v2`), or a
    Minari id. Default: the checkpoint's dataset, else hopper-medium-replay"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or DT .pkl file(s) to read instead of the official file (several:
    concatenated)"""
    # inference: beam search (TT paper §3.2) and its evaluation
    horizon: Optional[int] = None
    """planning horizon in transitions. Default: TT code's per dataset: 15; 5 on halfcheetah-medium,
    halfcheetah-medium-replay and walker2d-medium-expert; 20 on walker2d-medium-replay"""
    beam_width: Optional[int] = None
    """beams kept per step; 1 = greedy decoding of the action, no look-ahead (DT-like baseline).
    Default: TT code's per dataset: 128; 32 on halfcheetah-medium, -medium-replay, -medium-expert,
    walker2d-medium-replay"""
    n_expand: int = 2
    """candidates sampled per beam and step (TT code: 2)"""
    cdf_act: Optional[float] = None
    """drop the least likely action tokens whose total probability is below this (0 = off). Default:
    TT code's per dataset: 0.6; off on walker2d-medium-replay"""
    k_act: Optional[int] = None
    """keep only the k most likely action tokens (0 = off). Default: TT code's per dataset: off; 40
    on walker2d-medium-replay"""
    cdf_obs: float = 0.0
    """as --cdf-act, for observation tokens (TT code: off)"""
    k_obs: int = 1
    """as --k-act, for observation tokens (TT code: 1, the most likely observation)"""
    max_context: Optional[int] = None
    """transitions the planner sees, the current one included; at most the model's --seq-len.
    Default: TT code's 5, or the model's --seq-len (a checkpoint's) when that is shorter"""
    kv_cache: bool = True
    """reuse keys/values across generated tokens while the view only grows (exact); off: a full
    forward per token"""
    eval_episodes: int = 10
    """episodes per evaluation, all planned at once (batched over episodes x beams) in a vector
    env"""
    eval_max_steps: Optional[int] = None
    """cut evaluation episodes after N > 0 steps (default: the env's limit, 1000); cut scores are
    not comparable to papers'"""
    # --- the run: where and how it runs, what it keeps
    exp_name: str = METHOD
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler, the beam-search sampler and the evaluation
    envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    bf16: bool = True
    """bfloat16 autocast for training where the hardware has it natively (CUDA; CPUs with
    AVX512-BF16 or AMX); fp32 elsewhere. Planning stays fp32 unless --plan-bf16"""
    plan_bf16: bool = False
    """also plan under bf16 autocast (with --bf16, where native): faster, but not the TT code's
    fp32, and a bf16 forward can change which action wins; the beam scores are summed in fp32 either
    way"""
    compile: bool = False
    """torch.compile training: on CUDA the whole update (forward, backward, clip, optimizer step),
    replayed as CUDA graphs; on a CPU the model. Its time is results.json's compile_time_s (the
    first 3 updates), apart from the updates/s"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1)"""
    checkpoint: Optional[str] = None
    """a tt.py `model.pt`: start from its weights, architecture and bins (those flags are ignored);
    `--updates 0` only evaluates it, on its own dataset unless --env says"""
    resume: Optional[str] = None
    """a run folder (runs/RUN) that stopped before its end: continue it there, with its own flags,
    optimizer, schedule and random states, to its --updates; the result is the run it would have
    been without the stop"""
    save_every: int = 0
    """write the resumable checkpoint model.pt every N updates (0: at every evaluation and every 10%
    of the run); also at the end and on Ctrl-C, SIGTERM or SIGUSR1"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    eval_every: int = 0
    """evaluate before training and every N updates (0: only at the end; planning is expensive)"""
    log_every: int = 100
    """log the training loss every N updates"""
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

    def __post_init__(self):
        check_args(self)


# --- Data: each dimension of (s, a, r, V) discretized on its own; a transition is m_s + m_a + 2
# tokens.
class Discretizer:
    """Per-dimension bins: `edges` (N+1, D), non-decreasing down each column. A value maps to the
    last bin whose left edge it reaches (values outside [min, max] to the end bins); a bin decodes
    to its midpoint."""

    def __init__(self, edges: torch.Tensor):
        self.edges = edges.double()
        self.n_bins = edges.shape[0] - 1
        self.mid = (self.edges[:-1] + self.edges[1:]) / 2

    @classmethod
    def fit(cls, x: np.ndarray, n_bins: int, kind: str, device) -> Discretizer:
        if kind == "quantile":
            # Our choice: edges at evenly spaced ranks of each sorted column (min and max
            # included), the rule the TT code leaves commented out; its active rule (every
            # ceil(n/N)-th point) can give fewer than N bins on small data. Repeated values give
            # empty bins, which encode never produces.
            ranks = np.round(np.linspace(0, len(x) - 1, n_bins + 1)).astype(int)
            edges = np.sort(x, axis=0)[ranks]
        else:
            edges = np.linspace(x.min(0), x.max(0), n_bins + 1)
        return cls(torch.as_tensor(edges, dtype=torch.float64, device=device))

    def encode(self, x: torch.Tensor, dims=slice(None)) -> torch.Tensor:
        e = self.edges[:, dims]
        flat = x.reshape(-1, e.shape[1]).to(e).T.contiguous()
        idx = torch.searchsorted(e.T.contiguous(), flat, right=True) - 1
        return idx.clamp(0, self.n_bins - 1).T.reshape(x.shape)

    def decode(self, idx: torch.Tensor, dims=slice(None)) -> torch.Tensor:
        mid = self.mid[:, dims]
        bins = idx.reshape(-1, mid.shape[1]).clamp(0, self.n_bins - 1)
        return mid.gather(0, bins).reshape(idx.shape).float()


def value_targets(rewards: np.ndarray, discount: float) -> np.ndarray:
    """V_t = sum_k gamma^k r_{t+1+k} (TT code): the value token follows r_t, so it scores s_{t+1}
    onwards; an episode's end (terminal or timeout) is its end, nothing is bootstrapped."""
    v = np.zeros(len(rewards))
    acc = 0.0
    for t in range(len(rewards) - 2, -1, -1):
        acc = rewards[t + 1] + discount * acc
        v[t] = acc
    return v


def make_dataset(
    episodes, device, n_bins, discretizer, discount, terminal_penalty, edges=None
) -> dict:
    """Tokens (n, m_s + m_a + 2) of all transitions on the device, where each transition's episode
    ends, and the window starts: every step but an episode's last (TT code). `edges`: a
    checkpoint's bins instead of new ones."""
    joined = []
    for ep in episodes:
        r = ep["rewards"].astype(np.float64)
        if ep["terminated"]:
            r = np.append(r[:-1], terminal_penalty)  # TT code: the penalty replaces the last reward
        v = value_targets(r, discount)
        joined.append(np.column_stack([ep["observations"], ep["actions"], r, v]))
    joined = np.concatenate(joined)
    if edges is None:
        disc = Discretizer.fit(joined, n_bins, discretizer, device)
    else:
        disc = Discretizer(edges.to(device))
    lengths = np.array([len(ep["rewards"]) for ep in episodes])
    ends = np.cumsum(lengths)
    starts = np.concatenate([np.arange(e - n, e - 1) for e, n in zip(ends, lengths)])
    tokens = disc.encode(torch.as_tensor(joined, device=device))
    episode_end = torch.as_tensor(np.repeat(ends, lengths), device=device)
    starts = torch.as_tensor(starts, device=device)
    return {"tokens": tokens, "disc": disc, "end": episode_end, "starts": starts}


def sample_batch(data: dict, batch_size: int, K: int, gen: torch.Generator) -> tuple:
    """Windows of K transitions flattened to tokens: inputs and next-token targets. A window that
    runs past its episode's end continues with stop tokens (index N), as in the TT code."""
    starts, tokens = data["starts"], data["tokens"]
    s = starts[torch.randint(len(starts), (batch_size,), generator=gen, device=starts.device)]
    idx = s[:, None] + torch.arange(K, device=s.device)
    tok = tokens[idx.clamp(max=len(tokens) - 1)]
    past_end = (idx >= data["end"][s, None])[..., None]
    tok = torch.where(past_end, data["disc"].n_bins, tok).flatten(1)
    return tok[:, :-1], tok[:, 1:]


# --- Model: GPT over the flattened tokens, with per-dimension vocabularies and per-dimension
# output heads.
class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, allowed, past=None):
        B, T, C = x.shape
        heads = (z.view(B, T, self.n_head, C // self.n_head) for z in self.qkv(x).split(C, dim=2))
        q, k, v = (z.transpose(1, 2) for z in heads)
        if past is not None:  # keys/values of the earlier tokens of this view (planning)
            k = torch.cat([past[0], k], 2)
            v = torch.cat([past[1], v], 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C))), (k, v)


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 layout, GELU as in the TT code)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x, allowed, past=None):
        y, present = self.attn(self.ln1(x), allowed, past)
        x = x + y
        return x + self.mlp(self.ln2(x)), present


class TrajectoryTransformer(nn.Module):
    def __init__(self, obs_dim, act_dim, n_bins, K, n_layer, n_head, n_embd, dropout):
        super().__init__()
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.n_bins = n_bins
        # tokens per transition, s^1..s^m_s, a^1..a^m_a, r, V (the TT code's transition_dim)
        self.transition_dim = obs_dim + act_dim + 2
        self.block_size = K * self.transition_dim - 1
        # Dimension j of a transition has its own N token embeddings; the stop token is shared (TT
        # code).
        self.tok_emb = nn.Embedding(self.transition_dim * n_bins + 1, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # One output layer (no bias) per position in the transition of the *input* token (TT code's
        # EinLinear).
        self.head = nn.Parameter(torch.empty(self.transition_dim, n_bins + 1, n_embd))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                # GPT's init (TT code); ours for the heads too (TT: kaiming)
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.head, std=0.02)

    def forward(self, tokens, start: int = 0, cache=None):
        """tokens (B, T): bin indices (N = stop) at view positions start..start+T-1; a view starts
        at s^1 of a transition. cache: per-block (k, v) of positions 0..start-1. Returns next-token
        logits (B, T, N+1) and the new cache."""
        D = self.transition_dim
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        dim = pos % D
        vocab = torch.where(tokens == self.n_bins, D * self.n_bins, tokens + dim * self.n_bins)
        x = self.drop(self.tok_emb(vocab) + self.pos_emb[:, pos])
        keys = torch.arange(start + tokens.shape[1], device=tokens.device)
        # Causal, and no token attends to a value token (TT code): in the planner's context the
        # value is a placeholder (the true one is unknown), so values are predicted but never read.
        allowed = (keys[None] <= pos[:, None]) & (keys % D != D - 1)[None]
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, allowed, None if cache is None else cache[i])
            presents.append(present)
        return torch.einsum("btc,tvc->btv", self.ln_f(x), self.head[dim]), presents


# --- Loss and update (TT paper §3.1): teacher forcing on a weighted token cross-entropy.
def token_weights(model, T: int, action_weight, reward_weight, value_weight) -> torch.Tensor:
    """Cross-entropy weight of the target of input position p (the token at p+1): the TT code's
    weighting; observation tokens weigh 1."""
    w = [1.0] * model.obs_dim + [action_weight] * model.act_dim + [reward_weight, value_weight]
    return torch.tensor(w).repeat(T // model.transition_dim + 2)[1 : T + 1]


def tt_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy averaged over all target tokens, stop tokens included (TT code); in
    fp32 whatever the logits' precision."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce.view_as(targets) * weights).mean()


def make_optimizer(model, lr: float, lr_schedule: str, warmup_updates: float, decay_updates: float):
    """AdamW as in the TT code: betas (0.9, 0.95), weight decay 0.1 on linear and head matrices
    only; linear warmup, then a cosine floored at 10% (--lr-schedule). The TT code counts tokens, we
    count updates: the same up to stop tokens."""
    params = list(model.named_parameters())
    embeddings = ("tok_emb", "pos_emb")
    decayed = [p for n, p in params if p.dim() >= 2 and not n.startswith(embeddings)]
    rest = [p for n, p in params if p.dim() < 2 or n.startswith(embeddings)]
    groups = [{"params": decayed, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)  # one kernel a step
    warm, end = warmup_updates, decay_updates

    def clamped(step):
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(end - warm, 1))
        return max(0.1, 0.5 * (1 + math.cos(math.pi * progress)))

    # utils/training.py: the rate update `step` uses was set after `step` updates were done
    def tt_code(step):
        if step == 0:
            return 1.0  # the optimizer starts at --lr
        if step < warm:
            return step / warm
        progress = (step - warm) / max(end - warm, 1)  # not clamped: the rate cycles back up
        return max(0.1, 0.5 * (1 + math.cos(math.pi * progress)))

    factor = tt_code if lr_schedule == "tt" else clamped
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def update(model, opt, batch: tuple, weights, grad_clip: float, autocast) -> tuple:
    """One gradient step on the weighted token cross-entropy; returns the loss (detached) and the
    gradient norm."""
    x, y = batch
    with autocast:
        logits = model(x)[0]
    loss = tt_loss(logits.float(), y, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach(), grad_norm


# --- Planning: beam search with the model (TT paper §3.2, Alg. 1; TT code's beam_plan), batched
# over episodes.
@dataclass(frozen=True)
class PlanSettings:
    """Beam search's settings, each the flag of the same name (plan_settings reads them from
    Args)."""

    beam_width: int  # 1: greedy decoding of the action, no look-ahead
    n_expand: int
    horizon: int
    discount: float
    k_act: int
    cdf_act: float
    k_obs: int
    cdf_obs: float
    max_context: int
    kv_cache: bool = True


class Sequences:
    """Token sequences x (B, L) and the model's next-token logits at their ends. The model sees at
    most the last `max_block` tokens, cut at a transition boundary (TT code's crop). While that view
    only grows, new tokens reuse the cached keys/values (exact); a crop shifts every position, so it
    needs a fresh forward."""

    def __init__(self, model, x, max_block: int, use_cache: bool):
        self.model = model
        self.max_block = max_block
        self.use_cache = use_cache
        self.x = x[:, :0]
        self.lo = 0
        self.cache = None
        self.append(x)

    def append(self, new: torch.Tensor):
        self.x = torch.cat([self.x, new], 1)
        L, D = self.x.shape[1], self.model.transition_dim
        if self.cache is not None and L - self.lo <= self.max_block:
            start = L - new.shape[1] - self.lo
            logits, self.cache = self.model(new, start=start, cache=self.cache)
        else:
            # drop whole transitions, oldest first
            self.lo = -(-max(0, L - self.max_block) // D) * D
            logits, cache = self.model(self.x[:, self.lo :])
            self.cache = cache if self.use_cache else None
        self.logits = logits[:, -1, : self.model.n_bins].float()  # the stop token is never planned

    def select(self, rows: torch.Tensor):
        self.x = self.x[rows]
        self.logits = self.logits[rows]
        if self.cache is not None:
            self.cache = [(k[rows], v[rows]) for k, v in self.cache]


def filter_logits(logits: torch.Tensor, k: int, cdf: float) -> torch.Tensor:
    """TT code's filters. cdf: drop the least likely tokens whose summed probability stays below
    `cdf` (the most likely token always survives, our guard against an all-masked row); k: keep the
    k most likely."""
    if cdf > 0:
        p = logits.softmax(-1)
        ps = p.sort(-1).values
        cut = ps.gather(-1, ((ps.cumsum(-1) < cdf).sum(-1, keepdim=True) - 1).clamp(min=0))
        logits = logits.masked_fill((p <= cut) & (p < p.amax(-1, keepdim=True)), float("-inf"))
    if k > 0:
        kth = logits.topk(min(k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def sample_tokens(seqs: Sequences, n: int, k: int, cdf: float, gen: torch.Generator):
    for _ in range(n):
        probs = filter_logits(seqs.logits, k, cdf).softmax(-1)
        seqs.append(torch.multinomial(probs, 1, generator=gen))


def expected_value(probs: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """sum_i p_i mid_i over the bins, in fp32 even under bf16 autocast (--plan-bf16): the beam
    scores decide which plan wins, and bf16's 8-bit mantissa cannot tell apart returns that differ
    by under 1%."""
    with torch.autocast(probs.device.type, enabled=False):
        return probs.float() @ mid.float()


@torch.no_grad()
def plan(model, disc: Discretizer, prefix, planner: PlanSettings, gen) -> torch.Tensor:
    """prefix (E, P): each episode's context transitions and current observation tokens. Returns the
    action tokens (E, m_a) that start each episode's best plan (replanned every step)."""
    E, P = prefix.shape
    m_s, m_a = model.obs_dim, model.act_dim
    W, X, H, dev = planner.beam_width, planner.n_expand, planner.horizon, prefix.device
    view = min(planner.max_context * model.transition_dim - 1, model.block_size)
    seqs = Sequences(model, prefix, view, planner.kv_cache)
    # greedy decoding: the most likely token, dimension by dimension; no value, no look-ahead
    if W == 1:
        for _ in range(m_a):
            seqs.append(seqs.logits.argmax(-1, keepdim=True))
        return seqs.x[:, P:]
    base = torch.arange(E, device=dev)[:, None]
    seqs.select(base.repeat_interleave(W))  # one forward per episode's prefix, copied to its beams
    rewards = torch.zeros(E * W, H + 1, device=dev)
    discounts = planner.discount ** torch.arange(H + 1, device=dev, dtype=torch.float32)
    mids = disc.mid[:, m_s + m_a].float(), disc.mid[:, m_s + m_a + 1].float()
    for t in range(H):
        rows = (base * W + torch.arange(W, device=dev).repeat(X)).flatten()  # every beam X times
        seqs.select(rows)
        rewards = rewards[rows]
        sample_tokens(seqs, m_a, planner.k_act, planner.cdf_act, gen)
        for j, mid in enumerate(mids):
            # TT code: the most likely r and V tokens are appended and the score uses their
            # expectation over bin midpoints. Our choice: the expectation is over the N bins,
            # renormalised without the stop token.
            probs = seqs.logits.softmax(-1)
            rewards[:, t + j] = expected_value(probs, mid)
            seqs.append(probs.argmax(-1, keepdim=True))
        # score of a plan: sum_{t' <= t} gamma^t' r_t' + gamma^(t+1) V_t (the next step overwrites
        # rewards[:, t+1])
        scores = (rewards * discounts).sum(1).view(E, W * X)
        keep = (scores.topk(W, dim=1).indices + base * W * X).flatten()
        seqs.select(keep)
        rewards = rewards[keep]
        if t < H - 1:
            sample_tokens(seqs, m_s, planner.k_obs, planner.cdf_obs, gen)
    return seqs.x[base[:, 0] * W, P : P + m_a]  # topk sorts: each episode's first beam is its best


# --- Evaluation: all episodes at once in a vector env; one batched beam search per environment
# step.
@torch.no_grad()
def evaluate(
    model, disc, facts, planner, n, max_steps, seed, device, autocast, hook=None, video=None
) -> dict:
    """n episodes (cut after max_steps, if given), each env step planned for all of them at once.
    hook(t, prefix, action_tokens, alive), if given, sees every planning call (for analyses)."""
    m_s, m_a, D = model.obs_dim, model.act_dim, model.transition_dim
    envs, horizon = make_eval_envs(facts, n, False, video)
    horizon = min(horizon, max_steps or horizon)
    low, high = envs.single_action_space.low, envs.single_action_space.high
    act_dims, r_dim = slice(m_s, m_s + m_a), slice(m_s + m_a, m_s + m_a + 1)
    gen = torch.Generator(device=device).manual_seed(seed + 10_000)
    context = torch.zeros(n, 0, D, dtype=torch.long, device=device)
    returns, lengths, done = np.zeros(n), np.zeros(n, dtype=int), np.zeros(n, dtype=bool)
    plan_s, calls = 0.0, 0
    model.eval()
    obs, _ = envs.reset(seed=seed + 10_000)
    # One planning call per env step, all episodes at once: the bar counts those calls (hours on a
    # CPU at the paper's budget, so its rate and ETA are what a user waits on), episodes done and
    # env steps taken.
    shown = dict(leave=False, dynamic_ncols=True, mininterval=1.0)
    bar = tqdm(total=horizon, desc="evaluate", unit="plan step", **shown)
    t0 = time.perf_counter()
    for t in range(horizon):
        obs_tok = disc.encode(torch.as_tensor(obs, device=device), slice(0, m_s))
        prefix = torch.cat([context.flatten(1), obs_tok], 1)
        alive = torch.as_tensor(~done, device=device)
        act_tok = torch.zeros(n, m_a, dtype=torch.long, device=device)
        tp = time.perf_counter()
        with autocast:
            act_tok[alive] = plan(model, disc, prefix[alive], planner, gen)
        synchronize(device)  # the plan's work, not its launch; the env step waits for it anyway
        plan_s += time.perf_counter() - tp
        calls += 1
        if hook is not None:
            hook(t, prefix[alive], act_tok[alive], alive)
        action = disc.decode(act_tok, act_dims).cpu().numpy()
        obs, r, term, trunc, _ = envs.step(np.clip(action, low, high))
        r_tok = disc.encode(torch.as_tensor(r, device=device)[:, None], r_dim)
        # The context gets the executed action and the observed reward; the value is a placeholder
        # (token 0) that no token attends to (TT code: a placeholder too). It keeps max_context - 1
        # past transitions.
        step = torch.cat([obs_tok, act_tok, r_tok, torch.zeros_like(r_tok)], 1)
        context = torch.cat([context, step[:, None]], 1)
        context = context[:, context.shape[1] - min(context.shape[1], planner.max_context - 1) :]
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        bar.update()
        # episodes cut by --eval-max-steps count as done
        finished = n if t + 1 == horizon else int(done.sum())
        bar.set_postfix(episodes=f"{finished}/{n}", env_steps=int(lengths.sum()), refresh=False)
        if done.all():
            break
    synchronize(device)
    elapsed = time.perf_counter() - t0  # planning, decoding and env steps: env-steps/s
    bar.close()
    envs.close()
    model.train()
    plan_time = {"plan_s_per_step": plan_s / max(calls, 1)}
    plan_time["plan_s_per_episode_step"] = plan_s / max(lengths.sum(), 1)
    scores = common.episode_scores(facts, returns, lengths, elapsed)
    return {**scores, **plan_time, "max_steps": horizon}


# --- Training
def train(args: Args) -> dict:
    """TT paper §3: fit the token model by teacher forcing on the weighted cross-entropy (§3.1),
    then plan with it by beam search in the env (§3.2). The bookkeeping is below the banner."""
    run = open_run(args)  # flags, checkpoint and dataset checked; then the run folder, config.json
    args, device = run.args, run.device
    fresh = None if args.resume else run.dir  # removed if the checkpoint's weights do not fit
    data, disc, model = build(args, run.facts, run.ckpt, run.episodes, device, fresh)
    bf16, autocast, plan_autocast = precisions(args, device)
    banner(run, model, bf16)
    planner = plan_settings(args)

    def run_eval(step: int, video=None) -> dict:
        n, max_steps, seed = args.eval_episodes, args.eval_max_steps, args.seed
        res = evaluate(
            model, disc, run.facts, planner, n, max_steps, seed, device, plan_autocast, video=video
        )
        return log_evaluation(run.metrics, step, res)

    with catching_stops(run):  # Ctrl-C, SIGTERM, SIGUSR1: a clean stop, never a traceback
        if args.updates:
            epoch = len(data["starts"]) / args.batch_size  # updates per epoch
            warmup, decay = args.warmup_epochs * epoch, args.decay_epochs * epoch
            opt, sched = make_optimizer(model, args.lr, args.lr_schedule, warmup, decay)
            gen = torch.Generator(device=device).manual_seed(args.seed)
            evaluated = restore_run(run, opt, sched, gen)  # --resume: continue where it stopped
            loss_weights = (args.action_weight, args.reward_weight, args.value_weight)
            weights = token_weights(model, model.block_size, *loss_weights).to(device)
            how = ("update" if device.type == "cuda" else "model") if args.compile else "eager"
            run_update = compiled_update(model, opt, weights, args.grad_clip, autocast, how)
            watch = Stopwatch(run.clock, device, COMPILE_WARMUP if args.compile else 0)
            steps = range(run.done, args.updates)
            bar = tqdm(
                steps, "train", args.updates, initial=run.done, dynamic_ncols=True, mininterval=1
            )
            with saving_on_stop(run, model, disc, opt, sched, gen):  # then say how to resume
                if eval_due(run.done, args) and run.done not in evaluated:
                    run_eval(run.done)
                watch.start(run.done)
                for step in bar:
                    with one_update(run):  # a stop signal waits for it; an OOM is one line
                        lr = sched.get_last_lr()[0]  # the rate this update uses
                        batch = sample_batch(data, args.batch_size, args.seq_len, gen)
                        loss, grad_norm = run_update(batch)  # update(), compiled with --compile
                        sched.step()
                        run.done = step + 1
                        # .item() syncs the GPU: only on log lines, where a timed interval ends
                        logged = step % args.log_every == 0 or run.done == args.updates
                        if logged:
                            log_losses(run.metrics, step, {"ce": loss}, grad_norm, float(lr), bar)
                        watch.lap(run.done, logged)
                    if eval_due(run.done, args):
                        with watch.paused(run.done):
                            run_eval(run.done)
                    if save_due(run.done, args.updates, args.eval_every, args.save_every):
                        with watch.paused(run.done):
                            save_run(run, model, disc, opt, sched, gen)
        res = run_eval(run.done, video=str(run.dir / "video.mp4") if args.capture_video else None)
    return report(run, res, bf16)


# --- PLUMBING: run infrastructure, the same in every method file ----------------------------
# First tt.py's own: the flags' checks, the TT code's settings per dataset, the run's bookkeeping;
# then the blocks marked PLUMBING, dt.py's byte for byte.
def check_args(args: Args) -> None:
    """Each flag's own rule (Args.__post_init__): one line naming the flag, its value and the
    fix."""
    positive = "n_bins seq_len n_layer n_head n_embd batch_size lr grad_clip n_expand"
    non_negative = "seed eval_every k_obs threads save_every"
    check_flags(args, positive + " eval_episodes log_every", non_negative)
    check_given(args, "horizon beam_width n_epochs_ref max_context eval_max_steps", "updates k_act")
    if args.n_bins < 2:
        raise SystemExit(
            f"error: --n-bins {args.n_bins}: must be >= 2; one bin cannot tell two values apart."
        )
    for name in ("dropout", "cdf_act", "cdf_obs"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} {value}: must be in [0, 1).")
    if args.n_embd % args.n_head:
        raise SystemExit(
            f"error: --n-embd {args.n_embd}: must be divisible by --n-head {args.n_head}."
        )
    if not 0 < args.discount <= 1:
        raise SystemExit(f"error: --discount {args.discount}: must be in (0, 1].")
    if not 0 <= args.warmup_epochs <= args.decay_epochs:
        raise SystemExit(
            f"error: --warmup-epochs {args.warmup_epochs}: must be in "
            f"[0, --decay-epochs {args.decay_epochs}]."
        )
    if args.max_context is not None and args.checkpoint is None and args.max_context > args.seq_len:
        raise SystemExit(
            f"error: --max-context {args.max_context}: must be <= --seq-len {args.seq_len}, the "
            "trained window."
        )
    if args.updates == 0 and args.checkpoint is None and args.resume is None:
        raise SystemExit(
            "error: --updates 0 trains nothing; add --checkpoint runs/RUN/model.pt to evaluate one."
        )
    if args.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit(
            'error: --track needs wandb: pip install -e ".[track]" (or leave out --track).'
        )
    if args.capture_video and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # before MuJoCo is imported, which reads it once


def check_given(args, positive: str, non_negative: str) -> None:
    """check_flags for the flags whose default None means "resolved at run time": only those
    given."""

    def given(names: str) -> str:
        return " ".join(n for n in names.split() if getattr(args, n) is not None)

    check_flags(args, given(positive), given(non_negative))


# TT paper Table 1 (official D4RL v2; TT with beam search, DT from the same table). Their means over
# the 9 datasets are the blog's locomotion averages, TT 78.9 and DT 74.7.
TT_PAPER_TABLE_1 = {
    "tt": {
        "halfcheetah-medium-expert": 95.0,
        "hopper-medium-expert": 110.0,
        "walker2d-medium-expert": 101.9,
        "halfcheetah-medium": 46.9,
        "hopper-medium": 61.1,
        "walker2d-medium": 79.0,
        "halfcheetah-medium-replay": 41.9,
        "hopper-medium-replay": 91.5,
        "walker2d-medium-replay": 82.6,
    },
    "dt": {
        "halfcheetah-medium-expert": 86.8,
        "hopper-medium-expert": 107.6,
        "walker2d-medium-expert": 108.1,
        "halfcheetah-medium": 42.6,
        "hopper-medium": 67.6,
        "walker2d-medium": 74.0,
        "halfcheetah-medium-replay": 36.6,
        "hopper-medium-replay": 82.7,
        "walker2d-medium-replay": 66.6,
    },
}
# TT code (jannerm/trajectory-transformer), config/offline.py: `base` and the per-dataset overrides
# of the datasets we load, in our flags' terms (its k_act / cdf_act None = our 0, off). A setting no
# flag gives takes the dataset's entry, else the base; the other datasets (random, expert, Minari
# ids) get the base.
# fmt: off
TT_BASE = {"n_epochs_ref": 50, "beam_width": 128, "horizon": 15, "k_act": 0, "cdf_act": 0.6,
           "max_context": 5}
TT_DATASETS = {
    "halfcheetah-medium": {"horizon": 5, "beam_width": 32},
    "halfcheetah-medium-replay": {"horizon": 5, "beam_width": 32},
    "halfcheetah-medium-expert": {"beam_width": 32},
    "hopper-medium-replay": {"n_epochs_ref": 80},  # "train on the medium-replay datasets longer"
    "walker2d-medium-expert": {"horizon": 5},
    "walker2d-medium-replay": {"n_epochs_ref": 80, "horizon": 20, "beam_width": 32, "k_act": 40,
                               "cdf_act": 0.0},
}
# the flags that define the model and its tokens: a checkpoint's win over the command line's
ARCH = ("n_bins", "discretizer", "seq_len", "n_layer", "n_head", "n_embd", "discount",
        "terminal_penalty")
# fmt: on
# Flags that say where and how a run runs, not what it computes: --resume takes them from its own
# command line.
RUN_FLAGS = (
    "resume device threads runs_dir track wandb_project_name wandb_entity capture_video".split()
)


def with_base(args: Args) -> Args:
    """The settings train() resolves per run that are still None (plan or evaluate called from
    elsewhere, e.g. benchmarks/) take the TT code's base values."""
    unset = {k: v for k, v in TT_BASE.items() if getattr(args, k) is None}
    return replace(args, **unset) if unset else args


def plan_settings(args: Args) -> PlanSettings:
    """plan()'s settings from the flags; those still None take the TT code's base values."""
    args = with_base(args)
    return PlanSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PlanSettings)})


def resolve_settings(args: Args, name: str, windows: Optional[int], ckpt: Optional[dict]) -> tuple:
    """Each setting left out (None) takes the TT code's value for dataset `name` (TT_DATASETS, else
    TT_BASE); a flag wins. --max-context is capped at the model's --seq-len; --updates follows the
    TT code's epoch rule on the data's `windows`. Returns the arguments and the source of each
    setting."""
    entry, values, sources = TT_DATASETS.get(name, {}), {}, {}
    for k, base in TT_BASE.items():
        given = getattr(args, k) is not None
        values[k] = getattr(args, k) if given else entry.get(k, base)
        default = f"TT config/offline.py for {name}" if k in entry else "TT base"
        sources[k] = "flag" if given else default
    model = "the checkpoint's" if ckpt is not None else "the model's"
    if values["max_context"] > args.seq_len:
        # only a checkpoint's --seq-len gets here; Args checks the flag's own
        if args.max_context is not None:
            raise SystemExit(
                f"error: --max-context {args.max_context}: must be <= {model} --seq-len "
                f"{args.seq_len}, its trained window; leave out --max-context to plan with "
                f"{args.seq_len}."
            )
        values["max_context"] = args.seq_len
        sources["max_context"] += f", capped at {model} --seq-len {args.seq_len}"
    if windows == 0 and args.updates != 0:
        why = "every episode has a single step; TT windows need two or more"
        raise SystemExit(f"error: --env {name}: {why}.")
    values["updates"], sources["updates"] = args.updates, "flag"
    if args.updates is None:
        # TT code (scripts/train.py): about 10^6 x n_epochs_ref windows
        epochs = int(1e6 / windows * values["n_epochs_ref"])
        per_epoch = math.ceil(windows / args.batch_size)
        values["updates"] = epochs * per_epoch
        sources["updates"] = f"TT rule: {epochs} epochs of {per_epoch} updates ({windows} windows)"
    return replace(args, **values), sources


def planning_cost(args: Args, m_s: int, m_a: int) -> str:
    """What one planning call costs (one env step of every episode at once), counted as plan() runs:
    a forward pass over the prefix, then one pass per generated token (kv cache) for the action
    tokens, r and V of every horizon step, and the observation tokens of every step but the last."""
    steps = (
        f"episodes cut at {args.eval_max_steps} steps"
        if args.eval_max_steps
        else "episodes run to the env's step limit"
    )
    if args.beam_width == 1:
        passes = f"{1 + m_a} forward passes of 1 sequence per episode per env step"
        return f"greedy decoding: {passes}; {steps}"
    n = 1 + args.horizon * (m_a + 2) + (args.horizon - 1) * m_s
    return (
        f"beam {args.beam_width} x horizon {args.horizon}: about {n} forward passes of "
        f"{args.beam_width * args.n_expand} sequences per episode per env step; {steps}"
    )


@dataclass
class Run:
    """What train() keeps about its run besides the model and optimizer: the resolved flags, where
    it runs and writes, and how far it got."""

    args: Args
    sources: dict  # each resolved setting's source (a flag, the TT code's config)
    device: torch.device
    threads: int
    ckpt: Optional[dict]  # --checkpoint's model.pt, or --resume's own
    episodes: Optional[list]  # None when only evaluating a checkpoint on its own dataset
    facts: dict  # the dataset's facts (common.load_dataset's info)
    dir: Path
    t_start: float
    config: dict = dataclasses.field(default_factory=dict)
    done: int = 0  # updates done, before a stop too
    parent: int = 0  # updates of the model it started from
    clock: dict = dataclasses.field(default_factory=lambda: dict(train_time_s=0.0, wall_time_s=0.0))

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def arch(self) -> dict:
        return {k: getattr(self.args, k) for k in ARCH}


def start(args: Args) -> tuple:
    """The run's arguments, each setting's source, device, threads, checkpoint (--resume: the run's
    own), dataset and folder, all checked before the folder is made."""
    args = resumed_args(Args, args)
    device, threads = setup(args)
    resume_path = str(Path(args.resume) / "model.pt") if args.resume else None
    if args.resume:
        ckpt = load_checkpoint(resume_path, device, "--resume")
    else:
        ckpt = load_checkpoint(args.checkpoint, device)
    # the architecture and token definition are the checkpoint's, whatever the flags say
    if ckpt is not None:
        args = replace(args, **{k: ckpt["arch"][k] for k in ARCH})
    episodes, facts = load_data(args, ckpt)
    windows = sum(len(ep["rewards"]) - 1 for ep in episodes) if episodes is not None else None
    args, sources = resolve_settings(args, facts["name"], windows, ckpt)
    if args.capture_video:
        try:
            common.check_video(facts)
        except common.DatasetError as e:
            raise SystemExit(f"error: {e}") from None
    common.check_needs(memory_needs(args, facts, device), device)  # before the run folder
    run_dir = Path(args.resume) if args.resume else make_run_dir(args, facts)
    return args, sources, device, threads, ckpt, episodes, facts, run_dir


def memory_needs(args: Args, facts: dict, device) -> dict:
    """What each memory-bound flag of this run needs (bytes, estimated): flag -> (value, bytes,
    what it sizes). Training: common.transformer_bytes' GPT over the window's seq_len D - 1 tokens,
    plus the per-token logits over N + 1 bins (TT_LOGIT_VALUES of them per token and bin: the
    logits, their fp32 copy, the log-softmax, their gradients) and the gathered per-dimension
    heads. Planning (plan): beam_width x n_expand sequences per episode (1 when greedy), each with
    its keys and values in every layer for the model's view of at most max_context transitions,
    held twice while a select or an append copies them, plus one no-grad forward over the view and
    its logits. --beam-width is checked for one episode, --eval-episodes for all of them."""
    D = facts["obs_dim"] + facts["act_dim"] + 2
    C, L, bins = args.n_embd, args.n_layer, args.n_bins + 1
    needs, T = {}, args.seq_len * D - 1
    if args.updates:
        bf16, B = args.bf16 and bf16_native(device), args.batch_size
        need = common.transformer_bytes(B, T, C, L, args.n_head, bf16=bf16, device=device)
        need += 4.0 * (TT_LOGIT_VALUES * B * T * bins + 3 * T * bins * C)
        needs["--batch-size"] = (B, need, "a training update")
    per_episode = args.beam_width * args.n_expand if args.beam_width > 1 else 1
    view = min(args.max_context * D - 1, T)
    per_sequence = 4.0 * view * (2 * 2 * L * C + common.INFER_VALUES * C + bins)
    if args.beam_width > 1:
        what = f"a beam search (--n-expand {args.n_expand} sequences per beam)"
        needs["--beam-width"] = (args.beam_width, per_sequence * per_episode, what)
    n = args.eval_episodes
    need = n * per_episode * per_sequence + common.eval_env_bytes(n, False)
    needs["--eval-episodes"] = (n, need, "an evaluation")
    return needs


@contextlib.contextmanager
def one_update(run: Run):
    """A training update and its log line: a stop signal waits for its end (signals_deferred), an
    allocation failure in it is one line naming --batch-size (common.out_of_memory; a run folder
    that logged nothing yet is removed)."""
    fresh = None if run.args.resume else run.dir
    oom = ("--batch-size", run.args.batch_size, run.device, "a training update", fresh)
    with signals_deferred(), common.out_of_memory(*oom):
        yield


def open_run(args: Args) -> Run:
    """start(), then config.json, W&B (--track), and where a resumed run had got to."""
    t_start = time.time()
    run = Run(*start(args), t_start=t_start)
    resume = run.ckpt["resume"] if run.args.resume else None
    run.config = record_config(run.dir, run_config(run), resume)
    run.config.setdefault("sources", run.sources)  # a run resumed from before sources were recorded
    start_tracking(run.args, run.config, run.dir)
    if resume:
        run.done = resume["updates_done"]
        run.clock = dict(resume["clock"])
    if run.ckpt is not None:
        run.parent = run.ckpt["trained_updates"] - run.done
    return run


def run_config(run: Run) -> dict:
    """config.json: the flags, the architecture, the dataset's facts, each setting's source, and
    where the run runs."""
    args, ckpt = run.args, run.ckpt
    config = {"method": METHOD, "args": asdict(args), "arch": run.arch, "dataset": run.facts}
    config |= {"sources": run.sources, "device": str(run.device), "threads": run.threads}
    config |= {"git_commit": git_commit(), "torch": torch.__version__}
    # the flags the evaluated model was trained with: a checkpoint's when this run only evaluates it
    config["trained_with"] = ckpt["args"] if ckpt is not None and not args.updates else asdict(args)
    return config


def build(args: Args, facts: dict, ckpt: Optional[dict], episodes, device, fresh_run=None) -> tuple:
    """The tokenized data (None when the run only evaluates), the bins (a checkpoint's, else fitted
    to the data) and the model (a checkpoint's weights, if any)."""
    edges = None if ckpt is None else ckpt["edges"]
    data = None
    if args.updates:
        tokens = (args.n_bins, args.discretizer, args.discount, args.terminal_penalty)
        data = make_dataset(episodes, device, *tokens, edges=edges)
    disc = data["disc"] if data is not None else Discretizer(edges.to(device))
    dims = (facts["obs_dim"], facts["act_dim"], args.n_bins, args.seq_len)
    model = TrajectoryTransformer(*dims, args.n_layer, args.n_head, args.n_embd, args.dropout)
    model = model.to(device)
    if ckpt is not None:
        fit_weights(model, ckpt["model"], fresh_run)
    return data, disc, model


def precisions(args: Args, device) -> tuple:
    """Whether training runs in bf16, and the autocasts of training and of planning: TT plans in
    fp32, so bf16 planning only on request (--plan-bf16)."""
    bf16 = args.bf16 and bf16_native(device)
    train_autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    plan_bf16 = bf16 and args.plan_bf16
    plan_autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan_bf16)
    return bf16, train_autocast, plan_autocast


def banner(run: Run, model, bf16: bool) -> None:
    """What runs where, each resolved setting with its source, and what a planning call costs."""
    args, facts = run.args, run.facts
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    plan = "bf16" if bf16 and args.plan_bf16 else "fp32"
    where = f"{run.device}, {run.threads} CPU thread(s)"
    train = "bf16" if bf16 else "fp32"
    data = f"{facts['name']} ({facts['source']} data)"
    print(
        f"run {run.dir.name}: {data}, {model.transition_dim} tokens per transition, "
        f"{n_params:.2f}M parameters, device {where}, training {train}, planning {plan}"
    )
    sources = run.config["sources"].items()
    print("settings: " + ", ".join(f"{k} {getattr(args, k)} ({v})" for k, v in sources))
    print(f"planning: {planning_cost(args, model.obs_dim, model.act_dim)}")


def log_evaluation(path: Path, step: int, res: dict) -> dict:
    """An evaluation's score into metrics.jsonl (and W&B) and onto the terminal."""
    score = {"eval_return": res["return_mean"], "eval_normalized": res["normalized_mean"]}
    # a rate: not compared on resume
    speed = {"plan_steps_per_s": 1 / max(res["plan_s_per_step"], 1e-9)}
    log_metrics(path, step=step, eval_normalized_std=res["normalized_std"], **speed, **score)
    score_std = f"{res['normalized_mean']:.1f} ± {res['normalized_std']:.1f}"
    tqdm.write(f"update {step}: normalized score {score_std}")
    return res


def eval_due(n: int, args: Args) -> bool:
    """--eval-every N: before training and every N updates; the final evaluation is train()'s."""
    return bool(args.eval_every and n % args.eval_every == 0 and n < args.updates)


def compiled_update(model, opt, weights, grad_clip: float, autocast, how: str):
    """update() on one batch, as --compile wants it. `how`: "eager" (no --compile); "update" (CUDA):
    the whole update (forward, backward, clip, optimizer step) compiled and replayed as CUDA graphs
    (mode reduce-overhead: the batches' shapes never change), with the learning rate a tensor so
    that the schedule's steps do not recompile; "model" (CPU, which has no CUDA graphs and whose
    optimizer step is one fused kernel already): only the model compiled."""
    for group in opt.param_groups:
        lr = group["lr"]  # a float, or the tensor a compiled CUDA run's checkpoint left
        group["lr"] = torch.as_tensor(lr, device=weights.device) if how == "update" else float(lr)
    fixed = {"weights": weights, "grad_clip": grad_clip, "autocast": autocast}
    if how != "update":
        return functools.partial(
            update, torch.compile(model) if how == "model" else model, opt, **fixed
        )
    step = torch.compile(functools.partial(update, model, opt, **fixed), mode="reduce-overhead")

    def run(batch: tuple) -> tuple:
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for the graphs' outputs
        return step(batch)

    return run


# --compile: the first updates of a process compile (on CUDA also warm up and record the graphs)
COMPILE_WARMUP = 3
# memory_needs: the fp32 values a training update keeps per token and bin (the logits' fp32 copy,
# log-softmax, gradient). Measured as common.py's constants (peak-RSS rise of a fresh process
# over 2 calls, 1 thread): training 0.73-0.96x of the measured 0.5-1.6 GB (batch 32-128, width
# 64-256, 20-100 bins, bf16 and fp32), planning 0.77-0.84x of 0.1-0.7 GB (2-4 episodes x beam
# 32-128 x 2, and 64 greedy episodes): below the peaks, so the check refuses less, never a run
# that fits; an allocation failure past it is caught (one_update, catching_stops).
TT_LOGIT_VALUES = 3.0


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA runs asynchronously), so that a clock read after it
    times the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """The training time in run.clock: train_time_s and timed_updates (the updates/s) grow by
    intervals that end with the device synchronized, at log lines (whose .item() syncs anyway) and
    around evaluations and saves (not counted), never per update: on a GPU they time the work, not
    its launch. The first `warmup` updates (--compile's compilation) count as compile_time_s."""

    def __init__(self, clock: dict, device: torch.device, warmup: int):
        self.clock, self.device, self.warmup = clock, device, warmup
        self.t0, self.n0, self.warm_end = 0.0, 0, None

    def start(self, done: int) -> None:
        if self.warm_end is None:  # the process's first interval
            self.warm_end = done + self.warmup
            # a resumed run of before this clock timed every update
            self.clock.setdefault("timed_updates", done)
            self.clock.setdefault("compile_time_s", 0.0)
        synchronize(self.device)
        self.t0, self.n0 = time.perf_counter(), done

    def lap(self, done: int, due: bool = True) -> None:
        """Ends the interval at `done` updates when `due`, and always where the warmup ends."""
        if not due and done != self.warm_end:
            return
        synchronize(self.device)
        now = time.perf_counter()
        if self.n0 < self.warm_end:
            self.clock["compile_time_s"] += now - self.t0
        else:
            self.clock["train_time_s"] += now - self.t0
            self.clock["timed_updates"] += done - self.n0
        self.t0, self.n0 = now, done

    @contextlib.contextmanager
    def paused(self, done: int):
        self.lap(done)
        yield
        self.start(done)


def restore_run(run: Run, opt, sched, gen: torch.Generator) -> set:
    """--resume: the optimizer, schedule and random states where the run stopped, and metrics.jsonl
    cut back to that point. Returns the steps whose evaluation is logged."""
    if not run.args.resume:
        return set()
    resume = run.ckpt["resume"]
    restore_training_state(resume, opt, sched, gen)
    logged = trim_metrics(run.metrics, resume["metrics_lines"])
    return {m["step"] for m in logged if "eval_normalized" in m}


def make_checkpoint(
    model, disc: Discretizer, arch: dict, args: Args, facts: dict, total: int, state: dict
) -> dict:
    """model.pt: the weights with what evaluating them needs (architecture, bins, dataset facts),
    and the training state that --resume continues from."""
    parts = {"method": METHOD, "arch": arch, "args": asdict(args), "dataset": facts}
    parts["trained_updates"] = total
    return {"model": model.state_dict(), "edges": disc.edges.cpu(), **parts, "resume": state}


def save_run(run: Run, model, disc: Discretizer, opt, sched, gen: torch.Generator) -> None:
    """model.pt after run.done updates, written atomically: a --checkpoint, and --resume's start."""
    wall = {"wall_time_s": run.clock["wall_time_s"] + time.time() - run.t_start}
    state = training_state(run.done, opt, sched, gen, run.clock | wall, run.metrics)
    ckpt = make_checkpoint(model, disc, run.arch, run.args, run.facts, run.parent + run.done, state)
    save_atomic(ckpt, run.dir / "model.pt")


@contextlib.contextmanager
def catching_stops(run: Run):
    """Ctrl-C, SIGTERM and SIGUSR1 raise KeyboardInterrupt inside the block (catch_stop_signals);
    one that training does not handle (while only evaluating, or in the final evaluation, the model
    saved) ends the run in one line. The signal handlers are put back after."""
    old_handlers = catch_stop_signals()
    args, fresh = run.args, None if run.args.resume else run.dir
    beams = f"beams of --beam-width {args.beam_width} x --n-expand {args.n_expand} per episode"
    what = "an evaluation" + (f" ({beams})" if args.beam_width > 1 else "")
    try:  # an allocation failure here, outside a training update (one_update), is an evaluation's
        with common.out_of_memory("--eval-episodes", args.eval_episodes, run.device, what, fresh):
            yield
    except KeyboardInterrupt as stop:
        why = str(stop) or "Ctrl-C"
        message = f"interrupted ({why}) during the evaluation; {run.dir} keeps what it logged."
        raise SystemExit(message) from None
    finally:
        restore_signals(old_handlers)


@contextlib.contextmanager
def saving_on_stop(run: Run, model, disc: Discretizer, opt, sched, gen: torch.Generator):
    """A stop signal during training: save a resumable model.pt, then exit with the command that
    continues the run."""
    try:
        yield
    except KeyboardInterrupt as stop:
        save_run(run, model, disc, opt, sched, gen)
        message = stop_message(str(stop) or "Ctrl-C", run.parent + run.done, run.dir)
        raise SystemExit(message) from None


def report(run: Run, res: dict, bf16: bool) -> dict:
    """results.json (config, evaluation, updates, speed) and the final score, how it was planned,
    and the TT paper's numbers for the same dataset."""
    args, facts, done, total = run.args, run.facts, run.done, run.parent + run.done
    results = {**run.config, **res, "updates": done, "trained_updates": total}
    results["run_dir"] = str(run.dir)
    timed = run.clock.get("timed_updates", done)  # the compiling updates are not counted
    results["train_updates_per_s"] = timed / run.clock["train_time_s"] if timed else None
    results["compile_time_s"] = run.clock.get("compile_time_s") if args.compile else None
    results["bf16"] = bf16
    results["plan_bf16"] = bf16 and args.plan_bf16
    results["wall_time_s"] = run.clock["wall_time_s"] + time.time() - run.t_start
    (run.dir / "results.json").write_text(json.dumps(results, indent=2))
    finish_tracking(results)
    label = common.SOURCE_LABEL[facts["source"]]
    beam = f"beam {args.beam_width} x {args.n_expand}, horizon {args.horizon}"
    mode = "greedy" if args.beam_width == 1 else beam
    cut = f", episodes cut at {res['max_steps']} steps" if args.eval_max_steps else ""
    print(
        f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over "
        f"{args.eval_episodes} episodes ({label} data, {total} updates, {mode}{cut}); planning "
        f"{res['plan_s_per_step']:.3f} s per env step (all episodes at once)"
    )
    if facts["name"] in TT_PAPER_TABLE_1["tt"]:
        tt_score, dt_score = (TT_PAPER_TABLE_1[m][facts["name"]] for m in ("tt", "dt"))
        print(
            f"TT paper Table 1 (official D4RL, full training, beam 128): TT {tt_score}, "
            f"DT {dt_score}; locomotion averages TT 78.9, DT 74.7"
        )
    print(f"results: {run.dir / 'results.json'}")
    return results


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


STOP_SIGNALS = {
    "SIGINT": "Ctrl-C",
    "SIGTERM": "SIGTERM",
    "SIGUSR1": "SIGUSR1",
}  # PLUMBING: name -> what it is
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


def log_losses(path: Path, step: int, losses: dict, grad_norm, lr: float, bar) -> None:
    """PLUMBING: one update's losses and their sum, its gradient norm before clipping and its
    learning rate."""
    loss = {f"loss_{k}": v.item() for k, v in losses.items()}
    loss["loss"] = sum(loss.values())
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


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
