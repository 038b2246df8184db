"""Return-Guided Decision Translator (thesis Ch. 2, Eq. 2.3-2.8, Alg. 2): offline RL as translation
from a sequence of future returns to a sequence of past states, with actions from an inverse
dynamics model.

    python rgdt.py --env hopper-medium                            # §2.4's settings
    python rgdt.py --env hopper-medium --full-context-loss        # Fig. 2.3 (Eq. 2.7's indicator 1)
    python rgdt.py --env hopper-medium --dataset-path FILE        # a D4RL-layout .hdf5 or DT .pkl
    python rgdt.py --env hopper-medium --arch gpt --full-context-loss   # Fig. 2.2b's decoder-only
    python rgdt.py --checkpoint runs/RUN/model.pt --updates 0     # evaluate a model, train nothing
    python rgdt.py --resume runs/RUN                              # continue a stopped run

What the defaults cost: §2.4's 2·10^5 inverse-dynamics + 1.5·10^5 translator updates are
unmeasured on a GPU; on a quiet 2-core CPU the translator runs at about 14 updates/s, so a run is
3-4 hours, far more on a busy machine. For a first look on a CPU (minutes): --updates 3000
--inv-updates 5000 --eval-every 1000.

Defaults are §2.4's. Flags shared with dt.py keep dt.py's names and meanings; dt.py's --context-len
becomes two context lengths (--return-len K_r, --state-len K_s), and there is no timestep
embedding. Two models train one after the other, each with its own progress bar and losses
(`phase` in metrics.jsonl): the inverse dynamics (Eq. 2.8), then the translator (Eq. 2.7). Fig. 2.2
and the decoder's attention: benchmarks/rgdt_analysis.py. Ctrl-C, SIGTERM or SIGUSR1 save a
checkpoint that --resume continues, in either phase, as if the run had never stopped.

One file, the method first: its flags, data, the two models, their losses and updates, the action
step and evaluation of Alg. 2, train(); below the PLUMBING banner the run's infrastructure (run
folder, checkpoints, exact resume, stop signals, tracking). Blocks marked PLUMBING are the same,
byte for byte, in every method file that has them. Shared with the other method files is only
common.py (datasets, env ids, normalized scores).
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import common

METHOD = "rgdt"
DEFAULT_ENV = "hopper-medium"  # the dataset without --env or --checkpoint


@dataclass
class Args:
    # --- the state predictor (§2.3.1, Fig. 2.1)
    arch: Literal["seq2seq", "gpt"] = "seq2seq"
    """state predictor: `seq2seq`, the translator (Fig. 2.1: an encoder over the K_r future
    returns, a decoder over the K_s past states); `gpt`, one causal decoder over the tokens g_{j+1},
    s_j of each step of the state window (Fig. 2.2b's GPT, §2.4 aim 3; --n-layer blocks,
    --return-len and --n-enc-layer unused), with the same loss, data, inverse dynamics and
    inference. Fig. 2.2b's GPT is `--arch gpt --full-context-loss`"""
    return_len: int = 20
    """K_r, the number of future returns-to-go g_{t+1..t+K_r} the encoder reads (Eq. 2.5)"""
    state_len: int = 5
    """K_s, the number of past states s_{t-K_s+1..t} the decoder reads (Eq. 2.4)"""
    n_enc_layer: int = 2
    """encoder (return-side) transformer layers"""
    n_layer: int = 3
    """decoder (state-side) transformer layers"""
    n_head: int = 2
    """attention heads per layer, encoder and decoder"""
    n_embd: int = 64
    """embedding (hidden) size of encoder and decoder"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches of the translator"""
    # --- its loss (Eq. 2.7) and optimizer (§2.4)
    full_context_loss: bool = False
    """train on the next state at every decoder position (indicator of Eq. 2.7 = 1, the Fig. 2.3
    ablation); default: the final position only (indicator = 0), the thesis's choice"""
    batch_size: int = 256
    """segments per translator update"""
    lr: float = 5e-4
    """AdamW peak learning rate of the translator"""
    weight_decay: float = 1e-3
    """AdamW weight decay of the translator, applied to weight matrices only (not biases,
    LayerNorm, positions)"""
    warmup_steps: int = 10_000
    """linear learning-rate warmup of the translator, in updates"""
    updates: int = 150_000
    """translator gradient updates; with --checkpoint, 0 keeps its translator and N > 0 trains on
    from its weights"""
    grad_clip: float = 0.25
    """clip the translator's global gradient norm at this value (> 0; §2.4 gives none, this is
    DT's)"""
    # --- the inverse dynamics (§2.3.3, Eq. 2.8): model and optimizer
    inv_hidden: int = 512
    """width of each hidden layer of the inverse dynamics MLP (Eq. 2.8)"""
    inv_layers: int = 2
    """hidden layers of the inverse dynamics MLP"""
    inv_dropout: float = 0.1
    """dropout after each hidden layer of the inverse dynamics MLP"""
    inv_batch_size: int = 1024
    """transitions per inverse dynamics update"""
    inv_lr: float = 1e-4
    """Adam learning rate of the inverse dynamics"""
    inv_weight_decay: float = 1e-4
    """Adam (L2) weight decay of the inverse dynamics, applied to weight matrices only"""
    inv_updates: Optional[int] = None
    """inverse dynamics gradient updates. Default (None): §2.4's 200000, but 0 with --checkpoint and
    --updates 0, which then only evaluates; with --checkpoint, 0 keeps its inverse dynamics and
    N > 0 trains it on"""
    # --- data (§2.2.1)
    env: Optional[str] = None
    """dataset: a D4RL gym-mujoco name such as `hopper-medium` (with or without `-v2`), or a Minari
    id such as `mujoco/hopper/medium-v0`. Default: the checkpoint's dataset, else hopper-medium"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official
    file; several are concatenated (medium + expert = medium-expert). Without it the official file
    is read from $D4RL_DATASET_DIR (default ~/.d4rl/datasets), downloaded there first if missing"""
    rtg_scale: float = 1000.0
    """returns-to-go are divided by this before they enter the model"""
    # --- inference (Alg. 2)
    target_return: Optional[float] = None
    """default (None): condition on the best return-to-go per timestep in the dataset (§2.3.3); a
    number rescales that whole sequence so that it starts at this return (our knob, not the
    thesis's)"""
    eval_episodes: int = 10
    """episodes per evaluation, all run at once in a vector env"""
    # --- the run: where and how it runs, what it keeps
    exp_name: str = METHOD
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch samplers and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    compile: bool = False
    """torch.compile for training: on CUDA each model's whole update (forward, backward, clipping,
    optimizer step), replayed as CUDA graphs; on a CPU the state predictor. The compile time is
    reported apart (compile_time_s), not in the updates/s"""
    bf16: bool = True
    """bfloat16 autocast where the hardware has it natively (CUDA; CPUs with AVX512-BF16 or AMX);
    fp32 elsewhere"""
    eval_async: bool = False
    """step the evaluation envs in subprocesses (gymnasium AsyncVectorEnv); pays off with many CPU
    cores"""
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
    """a `model.pt` from an earlier run: start from its two models, architecture, state
    normalisation and best returns (the architecture flags are ignored); `--updates 0` only
    evaluates it, on its own dataset unless --env says (add --inv-updates N to train its inverse
    dynamics on)"""
    resume: Optional[str] = None
    """a run folder (runs/RUN) that stopped before its end: continue it there, in the phase it was
    in, with its own flags, optimizers, schedule and random states, to its --updates; the result is
    the run it would have been without the stop"""
    save_every: int = 0
    """write the resumable checkpoint model.pt every N updates of each phase (0: at every evaluation
    and every 10% of each phase); also at the end and on Ctrl-C, SIGTERM or SIGUSR1"""
    eval_every: int = 10_000
    """evaluate before training and every N translator updates (0: only at the end)"""
    log_every: int = 100
    """log the training losses every N updates"""

    def __post_init__(self):
        check_args(self)


# The flags that make each model (model.pt's arch): the state predictor's, the inverse dynamics'.
ARCH = "return_len state_len n_enc_layer n_layer n_head n_embd dropout rtg_scale".split()
INV_ARCH = "inv_hidden inv_layers inv_dropout".split()
INV_UPDATES = 200_000  # §2.4's inverse dynamics budget, --inv-updates' default when training


# --- Data (§2.2.1): trajectories as flat tensors on the training device; a batch is an index
# gather.
def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """g_t = sum_{t' >= t} r_t', the undiscounted return-to-go of §1.3.1 (Eq. 1.1's g tokens)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


def make_dataset(episodes: list[dict], device, rtg_scale: float, state_stats=None) -> dict:
    """Per-step tensors, and per step the bounds of its episode. `state_stats` (mean, std): a
    checkpoint's, so that training on and evaluating see its state scale."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    mean, std = state_stats if state_stats is not None else (obs.mean(0), obs.std(0) + 1e-6)
    # as saved in model.pt, so that a resumed run normalises exactly as the run it continues
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    lengths = np.array([len(ep["rewards"]) for ep in episodes])
    starts = np.cumsum(lengths) - lengths
    has_next = np.concatenate([np.arange(n) < n - 1 for n in lengths])
    actions = np.concatenate([ep["actions"] for ep in episodes])
    rtg = np.concatenate([returns_to_go(ep["rewards"]) for ep in episodes]) / rtg_scale
    data = {
        "states": torch.as_tensor((obs - mean) / std, dtype=torch.float32),
        "actions": torch.as_tensor(actions, dtype=torch.float32),
        "rtg": torch.as_tensor(rtg).float(),
        # per step: the first index of its episode, and one past its last
        "ep_start": torch.as_tensor(np.repeat(starts, lengths)),
        "ep_end": torch.as_tensor(np.repeat(starts + lengths, lengths)),
        # steps with a successor: the examples of both models
        "valid": torch.as_tensor(np.flatnonzero(has_next)),
    }
    return {**{k: v.to(device) for k, v in data.items()}, "state_stats": (mean, std)}


def gather_segments(data: dict, t: torch.Tensor, K_r: int, K_s: int) -> dict:
    """The example of Eq. 2.3 ending at each global step index t: the K_s past states
    s_{t-K_s+1..t} (left-padded at the episode start, `mask` marks real ones), their successors
    s_{t-K_s+2..t+1} as targets, and the K_r future returns g_{t+1..t+K_r}. Past the episode's end
    no more reward comes, so those returns are 0 (also at evaluation, where the conditioning
    sequence is padded with 0). Eq. 2.3 writes S_{t-K_s}^t and g_{t+1}^{t+K_r+1}, K_s + 1 and
    K_r + 1 items, while Eq. 2.4-2.5 and §2.4 call them "K_s states" and "K_r returns": we take K_s
    and K_r items, so --state-len 5 --return-len 20 are §2.4's numbers."""
    s_idx = t[:, None] + torch.arange(-K_s + 1, 1, device=t.device)  # (B, K_s)
    mask = s_idx >= data["ep_start"][t, None]
    s_idx = torch.where(mask, s_idx, t[:, None])
    real = mask[..., None].float()
    g_idx = t[:, None] + torch.arange(1, K_r + 1, device=t.device)  # (B, K_r)
    inside = g_idx < data["ep_end"][t, None]
    returns = torch.where(inside, data["rtg"][g_idx.clamp(max=len(data["rtg"]) - 1)], 0.0)
    states = data["states"][s_idx] * real
    next_states = data["states"][s_idx + 1] * real
    step_returns = data["rtg"][s_idx + 1, None] * real  # g_{j+1} beside each s_j: --arch gpt's
    batch = {"states": states, "next_states": next_states, "returns": returns[..., None]}
    return batch | {"mask": mask, "step_returns": step_returns}


def sample_steps(data: dict, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Global step indices t, uniform over all steps that have a successor (as in DT: a trajectory
    with probability proportional to its length, a step uniform in it). Both models' batches come
    from here."""
    valid = data["valid"]
    return valid[torch.randint(len(valid), (batch_size,), generator=gen, device=valid.device)]


def sample_batch(data: dict, batch_size: int, K_r: int, K_s: int, gen: torch.Generator) -> dict:
    """Translator segments (Eq. 2.3) ending at uniformly drawn steps."""
    return gather_segments(data, sample_steps(data, batch_size, gen), K_r, K_s)


def sample_transitions(data: dict, batch_size: int, gen: torch.Generator) -> dict:
    """The inverse dynamics' batch (§2.3.3): transitions (s_t, a_t, s_{t+1}) at uniformly drawn
    steps."""
    t = sample_steps(data, batch_size, gen)
    states = data["states"]
    return {"states": states[t], "next_states": states[t + 1], "actions": data["actions"][t]}


# --- Model (§2.3.1, Fig. 2.1): an encoder over returns, a decoder over states with causal
# self-attention and cross-attention to the encoder. Each modality has its own weights, the point
# of the design.
class Attention(nn.Module):
    """Multi-head attention of queries from `x` over keys/values from `context`: self-attention
    when context is x, cross-attention when it is the encoder's output."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.q, self.kv = nn.Linear(n_embd, n_embd), nn.Linear(n_embd, 2 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, context, allowed=None):
        B, T, C = x.shape
        k, v = self.kv(context).split(C, dim=2)
        heads = (self.q(x), k, v)
        d = C // self.n_head
        q, k, v = (z.view(B, z.shape[1], self.n_head, d).transpose(1, 2) for z in heads)
        p = self.dropout * self.training
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    """A transformer layer [6]: self-attention, (decoder only) cross-attention to the encoder,
    feed-forward. Pre-LayerNorm as in GPT-2 / DT rather than the original post-LayerNorm (§2.4 does
    not say; pre-LN trains stably at these learning rates); ReLU as in dt.py."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, cross: bool):
        super().__init__()
        self.ln1, self.ln3 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.self_attn = Attention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd) if cross else None
        self.cross_attn = Attention(n_embd, n_head, dropout) if cross else None
        layers = [nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd)]
        self.mlp = nn.Sequential(*layers, nn.Dropout(dropout))

    def forward(self, x, allowed=None, memory=None):
        h = self.ln1(x)
        x = x + self.self_attn(h, h, allowed)
        # every state position may see every encoded return: no mask
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.ln2(x), memory, None)
        return x + self.mlp(self.ln3(x))


def bounded_log_std(x: torch.Tensor) -> torch.Tensor:
    """A head's raw log-std squashed into [-5, 2], ODT's bounds, so the NLL cannot run off on a
    constant target."""
    return -5.0 + 3.5 * (torch.tanh(x) + 1)


class DecisionTranslator(nn.Module):
    """rho_theta(s_{t+1} | S_{-K_s}, g_{+K_r}) of Eq. 2.6: a diagonal Gaussian over the next
    state."""

    conditioning = "returns"  # the batch key of the returns it reads: g_{t+1..t+K_r}

    def __init__(
        self, state_dim, return_len, state_len, n_enc_layer, n_layer, n_head, n_embd, dropout,
        rtg_scale,
    ):  # fmt: skip
        super().__init__()
        self.state_dim, self.return_len, self.state_len = state_dim, return_len, state_len
        self.rtg_scale = rtg_scale
        # Learned positions within each sequence, as the vanilla transformer has positional
        # encodings [6]; no absolute timestep embedding (the thesis names none, and the
        # conditioning returns already follow the episode's clock).
        self.embed_g = nn.Linear(1, n_embd)
        self.pos_g = nn.Parameter(0.02 * torch.randn(return_len, n_embd))
        self.embed_s = nn.Linear(state_dim, n_embd)
        self.pos_s = nn.Parameter(0.02 * torch.randn(state_len, n_embd))
        self.drop = nn.Dropout(dropout)
        encoder = (Block(n_embd, n_head, dropout, cross=False) for _ in range(n_enc_layer))
        self.encoder = nn.ModuleList(encoder)
        decoder = (Block(n_embd, n_head, dropout, cross=True) for _ in range(n_layer))
        self.decoder = nn.ModuleList(decoder)
        self.ln_enc, self.ln_dec = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, 2 * state_dim)  # Eq. 2.6: mean and log-std of s_{t+1}

    def forward(self, returns, states, mask=None):
        """returns (B, K_r, 1), states (B, T <= K_s, m_s), mask (B, T) bool or None -> the mean and
        log-std of the next state at every decoder position (B, T, m_s)."""
        T = states.shape[1]
        memory = self.drop(self.embed_g(returns) + self.pos_g)
        for block in self.encoder:  # the encoder sees all K_r returns: no mask
            memory = block(memory)
        memory = self.ln_enc(memory)
        # Positions count back from the newest state, so a short context at the start of an
        # episode gets the same embeddings as a left-padded one in training.
        x = self.drop(self.embed_s(states) + self.pos_s[self.state_len - T :])
        # s_i never sees s_{>i}
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # padded keys are hidden; every position still sees itself, so that no row is empty
        if mask is not None:
            eye = torch.eye(T, dtype=torch.bool, device=x.device)
            allowed = (allowed & mask[:, None, None, :]) | eye
        for block in self.decoder:
            x = block(x, allowed, memory)
        mean, log_std = self.head(self.ln_dec(x)).split(self.state_dim, dim=-1)
        return mean, bounded_log_std(log_std)


class StateGPT(nn.Module):
    """--arch gpt, the decoder-only state predictor (Fig. 2.2b's "GPT model", §2.4 aim 3): one
    causal decoder of the translator's blocks (self-attention only) over Eq. 2.1's interleaving
    without actions, the tokens g_{j+1}, s_j of each step j of the state window. The mean and
    log-std of s_{j+1} are read at the s_j token, which sees its step's return and every earlier
    token. Each step is thus conditioned on its scalar return-to-go, where the translator reads the
    sequence of K_r future returns: the contrast §2.3 draws between the two formulations. The
    translator's constructor; return_len and n_enc_layer are not used."""

    conditioning = "step_returns"  # g_{j+1} beside each s_j (gather_segments; evaluate)

    def __init__(
        self, state_dim, return_len, state_len, n_enc_layer, n_layer, n_head, n_embd, dropout,
        rtg_scale,
    ):  # fmt: skip
        super().__init__()
        self.state_dim, self.return_len, self.state_len = state_dim, return_len, state_len
        self.rtg_scale = rtg_scale
        self.embed_g, self.embed_s = nn.Linear(1, n_embd), nn.Linear(state_dim, n_embd)
        # one learned position per step, shared by its two tokens (as DT's timestep embedding)
        self.pos_s = nn.Parameter(0.02 * torch.randn(state_len, n_embd))
        self.drop = nn.Dropout(dropout)
        blocks = (Block(n_embd, n_head, dropout, cross=False) for _ in range(n_layer))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, 2 * state_dim)

    def forward(self, returns, states, mask=None):
        """returns (B, T, 1), g_{j+1} beside each state; states (B, T <= K_s, m_s); mask (B, T) bool
        or None -> the mean and log-std of the next state at every state token (B, T, m_s)."""
        B, T, _ = states.shape
        # positions counted back from the newest step, as the translator's
        pos = self.pos_s[self.state_len - T :]
        tokens = torch.stack([self.embed_g(returns) + pos, self.embed_s(states) + pos], dim=2)
        x = self.drop(tokens.reshape(B, 2 * T, -1))
        allowed = torch.ones(2 * T, 2 * T, dtype=torch.bool, device=x.device).tril()
        if mask is not None:  # a padded step's two tokens are hidden; every token still sees itself
            keys = mask.repeat_interleave(2, dim=1)[:, None, None, :]
            allowed = (allowed & keys) | torch.eye(2 * T, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, allowed)
        mean, log_std = self.head(self.ln_f(x[:, 1::2])).split(self.state_dim, dim=-1)
        return mean, bounded_log_std(log_std)


def make_inverse_dynamics(state_dim, act_dim, hidden, layers, dropout) -> nn.Sequential:
    """pi_phi(a_t | s_t, s_{t+1}) of Eq. 2.8 (§2.3.3, policy extraction): an MLP from (s_t, s_{t+1})
    to the mean and log-std of a diagonal Gaussian over a_t."""
    mods, width = [], 2 * state_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, 2 * act_dim))


def inverse_dynamics(inv, s, s_next):
    """Mean mu_phi (tanh: actions live in [-1, 1]) and log-std of pi_phi(a | s, s_next), Eq. 2.8."""
    mean, log_std = inv(torch.cat([s, s_next], -1)).chunk(2, dim=-1)
    return torch.tanh(mean), bounded_log_std(log_std)


def make_models(arch: dict, device) -> tuple[nn.Module, nn.Sequential]:
    """The state predictor and the inverse dynamics that an `arch` dict (a checkpoint's, or this
    run's flags) describes; a checkpoint from before --arch holds a translator."""
    cls = StateGPT if arch.get("arch") == "gpt" else DecisionTranslator
    model = cls(arch["state_dim"], **{k: arch[k] for k in ARCH})
    inv = make_inverse_dynamics(arch["state_dim"], arch["act_dim"], *[arch[k] for k in INV_ARCH])
    return model.to(device), inv.to(device)


# --- Losses (Eq. 2.7, 2.8) and one update of each model.
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


def state_loss(mean, log_std, next_states, mask, full_context: bool) -> torch.Tensor:
    """Eq. 2.7, the NLL of Eq. 2.6's Gaussian. Indicator 0 (default): only the final position,
    s_{t+1} from the whole context (always real: segments are left-padded). Indicator 1: every real
    position i also predicts s_{i+1} from S_{..i} and all returns. We average over the positions
    used instead of summing them, which only rescales."""
    if full_context:
        return head_loss(mean, log_std, next_states, mask)
    return head_loss(mean[:, -1:], log_std[:, -1:], next_states[:, -1:], mask[:, -1:])


def inverse_dynamics_loss(inv, batch: dict) -> torch.Tensor:
    """Maximum likelihood of the batch's a_t given (s_t, s_{t+1}) (§2.3.3, Eq. 2.8)."""
    mean, log_std = inverse_dynamics(inv, batch["states"], batch["next_states"])
    actions = batch["actions"]
    every = torch.ones(len(actions), dtype=torch.bool, device=actions.device)
    return head_loss(mean, log_std, actions, every)


def make_optimizer(model, args):
    """AdamW, decaying matrices only (as nanoGPT: not learned positions), and a linear warmup."""
    wd, named = args.weight_decay, [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p.dim() >= 2 and not n.startswith("pos_") for n, p in named]
    groups = [
        {"params": [p for (_, p), d in zip(named, decay) if d == on], "weight_decay": wd * on}
        for on in (1, 0)
    ]
    # fused: one kernel for the whole step, on CPU and CUDA (foreach reads each step count back)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps))
    )


def make_inv_optimizer(inv, lr: float, weight_decay: float) -> torch.optim.Adam:
    """§2.4's Adam, its weight decay (L2) on the weight matrices only (§2.4 does not say which); no
    warmup or clipping (§2.4 names none)."""
    matrices = [p for p in inv.parameters() if p.dim() >= 2]
    others = [p for p in inv.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}]
    groups.append({"params": others, "weight_decay": 0.0})
    return torch.optim.Adam(groups, lr=lr, fused=True)  # one kernel a step (benchmarks/ops.py)


def update(model, opt, batch: dict, grad_clip: float, full_context: bool, autocast):
    """One AdamW step of the state predictor on Eq. 2.7; returns the loss (detached) and the
    gradient norm before clipping."""
    with autocast:
        mean, log_std = model(batch[model.conditioning], batch["states"], batch["mask"])
    loss = state_loss(mean, log_std, batch["next_states"], batch["mask"], full_context)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.detach(), grad_norm


def update_inverse(inv, opt, batch: dict, norm: bool):
    """One Adam step of the inverse dynamics on Eq. 2.8's likelihood; returns the loss (detached)
    and, when `norm`, the gradient norm (a pass over the gradients, paid on logged steps only;
    nothing clips them, §2.4 names no clipping), else None."""
    loss = inverse_dynamics_loss(inv, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in inv.parameters()]
    grad_norm = torch.nn.utils.get_total_norm(grads) if norm else None
    opt.step()
    return loss.detach(), grad_norm


# --- The action step (Alg. 2): condition on the best return per timestep, propose s_{t+1}, invert
# it to an action.
def best_return_sequence(episodes: list[dict]) -> np.ndarray:
    """§2.3.3: at each timestep the best return-to-go any dataset trajectory has at that timestep
    (unscaled), up to the longest trajectory's length."""
    best = np.full(max(len(ep["rewards"]) for ep in episodes), -np.inf)
    for ep in episodes:
        g = returns_to_go(ep["rewards"])
        best[: len(g)] = np.maximum(best[: len(g)], g)
    return best


def conditioning_returns(best: np.ndarray, target_return: Optional[float]) -> np.ndarray:
    """The returns Alg. 2 conditions on: the best return per timestep (§2.3.3), or with
    --target-return (our knob, not the thesis's) the same sequence rescaled to start at that
    return."""
    if target_return is None:
        return best
    if best[0] <= 0:
        why = f"the best return at t = 0 is {best[0]:.1f}, not > 0, so it cannot be rescaled"
        raise SystemExit(f"error: --target-return {target_return}: {why}; leave the flag out.")
    return best * target_return / best[0]


def act(model, inv, returns, states, low, high, autocast):
    """Alg. 2 lines 6-7 for one env step of every episode: the state predictor's mean s^_{t+1}
    from the context (`states`, the last <= K_s states, and `returns` as model.conditioning says),
    then a_t = mu_phi(s_t, s^_{t+1}) within the action bounds [low, high]."""
    with autocast:  # the state predictor as it was trained; the inverse dynamics (fp32) outside
        s_next, _ = model(returns, states)
    a, _ = inverse_dynamics(inv, states[:, -1], s_next[:, -1].float())
    return torch.maximum(torch.minimum(a.float(), high), low)


# --- Evaluation: all episodes at once in a vector env, one batched forward of each model per step.
@dataclass(frozen=True)
class EvalSettings:
    """The flags an evaluation reads: --eval-episodes, --seed (its envs reset from seed + 10000)
    and --eval-async."""

    episodes: int
    seed: int = 0
    asynchronous: bool = False


@torch.no_grad()
def evaluate(
    model, inv, facts, state_stats, conditioning, settings, device, autocast, video=None
) -> dict:
    """Roll out settings.episodes episodes of Alg. 2 conditioned on `conditioning` (unscaled
    returns, one per timestep; 0 past its end: no reward is left, as for the returns past an
    episode's end in training)."""
    n, K_s, K_r = settings.episodes, model.state_len, model.return_len
    envs, horizon = make_eval_envs(facts, n, settings.asynchronous, video)
    bounds = (envs.action_space.low, envs.action_space.high)
    low, high = (torch.as_tensor(b[0], device=device) for b in bounds)
    mean, std = (torch.as_tensor(x, device=device) for x in state_stats)
    g = torch.zeros(horizon + K_r, device=device)
    given = torch.as_tensor(conditioning[: len(g)], dtype=torch.float32, device=device)
    g[: len(given)] = given / model.rtg_scale
    states = torch.zeros(n, horizon, facts["obs_dim"], device=device)
    returns, lengths, done = np.zeros(n), np.zeros(n, dtype=int), np.zeros(n, dtype=bool)
    model.eval()
    inv.eval()
    obs, _ = envs.reset(seed=settings.seed + 10_000)
    look = dict(unit="episode", leave=False, dynamic_ncols=True, mininterval=1.0)
    bar = tqdm(total=n, desc="evaluate", **look)
    t0 = time.perf_counter()
    for t in range(horizon):  # t counts from 0, the thesis's timesteps from 1
        states[:, t] = (torch.as_tensor(obs, device=device, dtype=torch.float32) - mean) / std
        ctx = slice(max(0, t - K_s + 1), t + 1)  # S_{-K_s}: the last K_s states, fewer at first
        cond = g[t + 1 : t + 1 + K_r]  # g_{+K_r} = g_{t+1..t+K_r}
        if model.conditioning == "step_returns":  # --arch gpt: g_{j+1} beside each state s_j
            cond = g[ctx.start + 1 : t + 2]
        cond = cond.expand(n, -1)[..., None]  # the same in every env
        a = act(model, inv, cond, states[:, ctx], low, high, autocast)
        obs, r, term, trunc, _ = envs.step(a.cpu().numpy())  # Alg. 2 lines 8-9
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        bar.update(int(done.sum()) - bar.n)
        bar.set_postfix(env_steps=int(lengths.sum()), refresh=False)
        if done.all():
            break
    wait_for(device)  # env steps/s of work done, not of work queued on the device
    elapsed = time.perf_counter() - t0
    bar.close()
    envs.close()
    model.train()
    inv.train()
    return common.episode_scores(facts, returns, lengths, elapsed)


# --- Training (§2.3-2.4): the inverse dynamics, then the translator.
def train(args: Args) -> dict:
    """Fit pi_phi on Eq. 2.8, then rho_theta on Eq. 2.7, evaluating Alg. 2 before the first update,
    every --eval-every translator updates and at the end. A stopped run resumes in its phase."""
    run = open_run(args)  # flags, seeds, device, checkpoint, dataset, run folder, config.json
    args, device, facts, autocast = run["args"], run["device"], run["facts"], run["autocast"]
    model, inv = make_models(run["arch"], device)
    fresh = None if args.resume else run["dir"]  # removed if the checkpoint's weights do not fit
    stats = load_weights(model, inv, run["ckpt"], fresh)  # a checkpoint's, with its state scale
    announce(run, model, inv)
    settings = EvalSettings(args.eval_episodes, args.seed, args.eval_async)

    def run_eval(phase: str, step: int, video: Optional[str] = None) -> dict:
        cond = run["conditioning"]
        res = evaluate(model, inv, facts, stats, cond, settings, device, autocast, video=video)
        log_score(run, phase, step, res)
        return res

    with stops_reported(run):  # Ctrl-C, SIGTERM, SIGUSR1: save, and say how to go on
        if run["training"]:
            data = make_dataset(run["episodes"], device, run["arch"]["rtg_scale"], stats)
            stats = data["state_stats"]
            inv_opt = make_inv_optimizer(inv, args.inv_lr, args.inv_weight_decay)
            opt, sched = make_optimizer(model, args)
            compiled = compiled_updates(model, opt, inv_opt, device, args.compile)
            fwd, update_model, update_inv = compiled
            inv_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
            gen = torch.Generator(device=device).manual_seed(args.seed)

            def inverse_step(log: bool):  # §2.3.3: Eq. 2.8 on uniformly drawn transitions
                batch = sample_transitions(data, args.inv_batch_size, inv_gen)
                loss, grad_norm = update_inv(inv, inv_opt, batch, norm=log)
                return loss, grad_norm, args.inv_lr

            def translator_step(log: bool):  # §2.3.2: Eq. 2.7 on segments of Eq. 2.3
                batch = sample_batch(data, args.batch_size, model.return_len, model.state_len, gen)
                lr = sched.get_last_lr()[0]  # the rate this update uses
                full = args.full_context_loss
                loss, grad_norm = update_model(fwd, opt, batch, args.grad_clip, full, autocast)
                sched.step()
                return loss, grad_norm, lr

            # in this order: the translator's evaluations need the inverse dynamics
            phases = {
                "inverse": Phase(inverse_step, inv_opt, None, inv_gen, args.inv_updates),
                "translator": Phase(translator_step, opt, sched, gen, args.updates),
            }
            fit(phases, model, inv, checkpoint_frame(run, stats), run, run_eval)
        else:
            print(evaluation_cost(facts, args.eval_episodes))
        video = str(run["dir"] / "video.mp4") if args.capture_video else None
        res = run_eval("final", run["progress"]["translator"], video=video)
    return finish(run, res)


# --- PLUMBING: run infrastructure, the same in every method file ----------------------------------
# Table 2.1 (official D4RL v2, 10 seeds), RGDT column, printed beside our score. Its printed total
# is 539.0, but these rows add up to 540.0 (every other column of the table adds up): one row, or
# the total, is off by 1.0 in the thesis.
# fmt: off
THESIS = {"halfcheetah-medium": 44.4, "hopper-medium": 93.2, "walker2d-medium": 83.3,
          "halfcheetah-medium-expert": 93.4, "hopper-medium-expert": 112.4,
          "walker2d-medium-expert": 113.3}
# fmt: on
# The two trainings in their order (the translator's evaluations need the inverse dynamics): label.
PHASES = {"inverse": "inverse dynamics", "translator": "translator"}
# --arch's state predictors by name (None: a checkpoint from before --arch)
PREDICTOR = {"gpt": "GPT state predictor", "seq2seq": "translator", None: "translator"}
# each phase's batch flag, and what one of its steps is (common.out_of_memory's line)
PHASE_BATCH = {
    "inverse": ("--inv-batch-size", "an inverse dynamics update"),
    "translator": ("--batch-size", "a translator update"),
}
# results.json's updates/s of each phase
SPEED = {"inverse": "inv_train_updates_per_s", "translator": "train_updates_per_s"}
# --compile: the updates of each process whose time is compile time, not training time (the first
# compiles; CUDA graphs are recorded after a warmup run)
COMPILE_WARMUP = 3
# memory_needs' constants. The decoder's cross-attention counts as half a layer more (its queries,
# keys and values over the K_r returns, projection, LayerNorm); the state predictor's training
# then needs PREDICTOR_FACTOR times common.transformer_bytes (fitted to dt.py's model: these
# short, narrow sequences keep more per token), and the inverse dynamics INV_VALUES fp32 values per
# transition and hidden unit of each layer. Measured as common.py's constants (peak-RSS rise of a
# fresh process over 2 updates, 1 thread): the estimate is 0.79-1.04x of the measured 0.74-2.7 GB
# (batch 2048-8192, width 64-128, seq2seq and gpt, bf16 and fp32), 1.00-1.02x for the inverse
# dynamics (0.5-1.9 GB, batch 32768-131072), 0.53-1.3x for an evaluation's forwards (0.24-0.53 GB
# for 4096-8192 episodes, little beside their envs' 1.1 MB each, common.ENV_BYTES).
CROSS_SHARE = 0.5
PREDICTOR_FACTOR = 1.2
INV_VALUES = 3.6
# Flags that say where and how a run runs, not what it computes: --resume takes them from its own
# command line.
RUN_FLAGS = "resume device threads eval_async runs_dir track wandb_project_name".split()
RUN_FLAGS += ["wandb_entity", "capture_video"]


def check_args(args: Args) -> None:
    """Every flag checked when Args is made, one line naming the flag, its value and the fix;
    --inv-updates' default resolved (a resumed run takes its own)."""
    if args.inv_updates is None and args.resume is None:
        evaluating = args.checkpoint is not None and args.updates == 0
        args.inv_updates = 0 if evaluating else INV_UPDATES
    positive = "return_len state_len n_enc_layer n_layer n_head n_embd batch_size lr grad_clip"
    positive += " rtg_scale eval_episodes log_every inv_hidden inv_layers inv_batch_size inv_lr"
    non_negative = "seed weight_decay warmup_steps updates inv_weight_decay eval_every threads"
    non_negative += " save_every" + (" inv_updates" if args.inv_updates is not None else "")
    check_flags(args, positive, non_negative)
    for name in ("dropout", "inv_dropout"):
        if not 0 <= getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: {flag} {getattr(args, name)}: must be in [0, 1).")
    if args.n_embd % args.n_head:
        why = f"must be divisible by --n-head {args.n_head}"
        raise SystemExit(f"error: --n-embd {args.n_embd} {why}.")
    if args.target_return is not None and not 0 < args.target_return < math.inf:
        why = "pass a finite return > 0, or leave it out for the best return per timestep (§2.3.3)"
        raise SystemExit(f"error: --target-return {args.target_return}: {why}.")
    # else the run ends before it reaches --lr
    if args.updates and args.warmup_steps > args.updates:
        scaled = max(1, args.updates // 10)
        print(f"note: --warmup-steps {args.warmup_steps} is longer than --updates {args.updates}; "
              f"warming up over {scaled} updates (a tenth of the run) instead")  # fmt: skip
        args.warmup_steps = scaled
    for name in ("updates", "inv_updates"):
        if getattr(args, name) == 0 and args.checkpoint is None:
            flag = "--" + name.replace("_", "-")
            why = "leaves a model untrained; add --checkpoint runs/RUN/model.pt"
            raise SystemExit(f"error: {flag} 0 {why}.")
    if args.track and importlib.util.find_spec("wandb") is None:
        why = 'pip install -e ".[track]" (or leave out --track)'
        raise SystemExit(f"error: --track needs wandb: {why}.")
    if args.capture_video and not os.environ.get("DISPLAY"):  # MuJoCo reads it once, on import
        os.environ.setdefault("MUJOCO_GL", "egl")


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


# PLUMBING: name -> what it is
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


# The run of train(): its inputs, folder and config, the two phases' loop with evaluations,
# checkpoints and exact resume, stop signals and the results.
def read_inputs(args: Args, device):
    """The checkpoint (--resume's or --checkpoint's), the training state it holds, the dataset and
    the architecture."""
    if args.resume:
        ckpt = load_checkpoint(str(Path(args.resume) / "model.pt"), device, "--resume")
    else:
        ckpt = load_checkpoint(args.checkpoint, device)
    episodes, facts = load_data(args, ckpt)
    if episodes is None and args.inv_updates:  # no data is read with --updates 0; this needs it
        episodes, facts = load_data(replace(args, updates=args.inv_updates), ckpt)
    dims = {"state_dim": facts["obs_dim"], "act_dim": facts["act_dim"]}
    arch = {**{k: getattr(args, k) for k in ARCH + INV_ARCH}, **dims, "arch": args.arch}
    arch = ckpt["arch"] if ckpt is not None else arch
    if args.capture_video:
        try:
            common.check_video(facts)
        except common.DatasetError as e:
            raise SystemExit(f"error: {e}") from None
    common.check_needs(memory_needs(args, arch, device), device)  # before the run folder
    return ckpt, (ckpt["resume"] if args.resume else None), episodes, facts, arch


def memory_needs(args: Args, arch: dict, device) -> dict:
    """What each memory-bound flag of this run needs (bytes, estimated): flag -> (value, bytes,
    what it sizes). The translator is common.transformer_bytes' GPT twice, the encoder over the K_r
    returns and the decoder over the K_s states with its cross-attention (CROSS_SHARE); --arch gpt
    is one GPT over 2 K_s tokens; in training both times PREDICTOR_FACTOR. The inverse dynamics,
    an MLP in fp32, keeps INV_VALUES values per hidden unit and layer of each transition. The
    evaluation: one no-grad forward per episode and step, and its envs."""
    bf16 = args.bf16 and bf16_native(device)
    C, h, gpt = arch["n_embd"], arch["n_head"], arch.get("arch") == "gpt"
    K_r, K_s, L_enc, L_dec = (
        arch[k] for k in ("return_len", "state_len", "n_enc_layer", "n_layer")
    )

    def predictor(batch: int, train: bool) -> float:
        kw = dict(bf16=bf16, train=train, device=device)
        factor = PREDICTOR_FACTOR if train else 1.0
        if gpt:
            return factor * common.transformer_bytes(batch, 2 * K_s, C, L_dec, h, **kw)
        enc = common.transformer_bytes(batch, K_r, C, L_enc, h, **kw)
        dec = (1 + CROSS_SHARE) * common.transformer_bytes(batch, K_s, C, L_dec, h, **kw)
        return factor * (enc + dec)

    needs = {}
    if args.updates:
        what = "a translator update" if not gpt else "a state predictor update"
        needs["--batch-size"] = (args.batch_size, predictor(args.batch_size, True), what)
    if args.inv_updates:
        width = arch["inv_hidden"] * arch["inv_layers"] + 2 * arch["state_dim"]
        need = 4.0 * INV_VALUES * args.inv_batch_size * width
        needs["--inv-batch-size"] = (args.inv_batch_size, need, "an inverse dynamics update")
    n = args.eval_episodes
    need = predictor(n, False) + common.eval_env_bytes(n, args.eval_async)
    needs["--eval-episodes"] = (n, need, "an evaluation")
    return needs


def start_run(args, device, threads: int, facts, arch, ckpt, resume, training: bool):
    """The run folder (a resumed run's own; `-eval` when nothing trains) and its config.json."""
    if args.resume:
        run_dir = Path(args.resume)
    else:  # make_run_dir reads --updates: here, training either model is training
        run_dir = make_run_dir(replace(args, updates=int(training)), facts)
    config = {"method": METHOD, "args": asdict(args), "arch": arch, "dataset": facts}
    config |= {"target_return": args.target_return, "device": str(device), "threads": threads}
    config |= {"git_commit": git_commit(), "torch": torch.__version__}
    # the flags the evaluated model was trained with: a checkpoint's when this run only evaluates it
    config["trained_with"] = ckpt["args"] if ckpt is not None and not training else asdict(args)
    config = record_config(run_dir, config, resume)
    if resume is not None:  # and the phase it went on in
        config["resumed"][-1]["phase"] = resume["progress"]["phase"]
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    start_tracking(args, config, run_dir)
    return run_dir, config


def open_run(args: Args) -> dict:
    """What a run starts from, every input checked before its folder is made: the flags (a resumed
    run's own), seeds and device, checkpoint, dataset and conditioning returns; then the run
    folder, config.json and --track; each phase's progress and the clocks (a resumed run's)."""
    t_start = time.time()
    args = resumed_args(Args, args)
    device, threads = setup(args)
    ckpt, resume, episodes, facts, arch = read_inputs(args, device)
    if episodes is None:  # a checkpoint evaluated alone: its own best returns
        best = ckpt["best_returns"].cpu().numpy()
    else:
        best = best_return_sequence(episodes)
    conditioning = conditioning_returns(best, args.target_return)
    training = bool(args.updates or args.inv_updates)
    run_dir, config = start_run(args, device, threads, facts, arch, ckpt, resume, training)
    bf16 = args.bf16 and bf16_native(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    zero = {"phase": "inverse", "inverse": 0, "translator": 0}
    progress = dict(resume["progress"]) if resume else zero
    keys = {"translator": "trained_updates", "inverse": "trained_inv_updates"}
    before = {k: ckpt[key] - progress[k] if ckpt is not None else 0 for k, key in keys.items()}
    clock = phase_clocks(resume, progress)
    inputs = {"args": args, "device": device, "threads": threads, "ckpt": ckpt, "resume": resume}
    inputs |= {"episodes": episodes, "facts": facts, "arch": arch, "best": best}
    inputs |= {"conditioning": conditioning, "training": training, "config": config}
    inputs |= {"bf16": bf16, "autocast": autocast}
    run = {"dir": run_dir, "metrics": run_dir / "metrics.jsonl", "t_start": t_start}
    return run | inputs | {"progress": progress, "before": before, "clock": clock}


def load_weights(model, inv, ckpt: Optional[dict], fresh_run=None):
    """A checkpoint's two models, and its state normalisation (None without a checkpoint)."""
    if ckpt is None:
        return None
    fit_weights(model, ckpt["model"], fresh_run)
    fit_weights(inv, ckpt["inverse_dynamics"], fresh_run)
    return tuple(np.asarray(ckpt[k].cpu()) for k in ("state_mean", "state_std"))


def announce(run: dict, model, inv) -> None:
    """The run's first line: where, on what data, how big, on what device and precision."""
    facts = run["facts"]
    sizes = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (model, inv)]
    name = PREDICTOR[run["arch"].get("arch")]
    print(
        f"run {run['dir'].name}: {facts['name']} ({facts['source']} data), {name} {sizes[0]:.2f}M "
        f"+ inverse dynamics {sizes[1]:.2f}M parameters, device {run['device']}, "
        f"{run['threads']} CPU thread(s), {'bf16' if run['bf16'] else 'fp32'}"
    )


def log_score(run: dict, phase: str, step: int, res: dict) -> None:
    """An evaluation's score: a metrics line and a printed one."""
    mean, std = res["normalized_mean"], res["normalized_std"]
    score = {"eval_return": res["return_mean"], "eval_normalized": mean}
    log_metrics(run["metrics"], phase=phase, step=step, eval_normalized_std=std, **score)
    label = PHASES.get(phase, "translator")  # the final evaluation follows the translator's last
    tqdm.write(f"{label} update {step}: normalized score {mean:.1f} ± {std:.1f}")


def checkpoint_frame(run: dict, state_stats) -> dict:
    """What every model.pt of a run holds besides the weights: what evaluating them needs
    (architecture, dataset facts, state normalisation, best returns) and the flags."""
    mean, std = (torch.as_tensor(x) for x in state_stats)
    parts = {"method": METHOD, "arch": run["arch"], "args": asdict(run["args"])}
    parts |= {"dataset": run["facts"], "state_mean": mean, "state_std": std}
    return parts | {"best_returns": torch.as_tensor(run["best"])}


def make_checkpoint(model, inv, frame: dict, totals: dict, state: dict) -> dict:
    """model.pt: both models, the updates each has had, the state --resume continues from."""
    nets = {"model": model.state_dict(), "inverse_dynamics": inv.state_dict()}
    counts = {"trained_updates": totals["translator"], "trained_inv_updates": totals["inverse"]}
    return {**nets, **frame, **counts, "resume": state}


@dataclass
class Phase:
    """One of the two trainings: its step (one batch and update; it returns the loss, the gradient
    norm or None and the learning rate), what an exact resume restores, its update count."""

    step: Callable[[bool], tuple]
    opt: torch.optim.Optimizer
    sched: Optional[torch.optim.lr_scheduler.LRScheduler]
    gen: torch.Generator
    total: int


def eval_due(phase: str, n: int, args) -> bool:
    """Evaluations while training: once before the inverse dynamics trains, then every --eval-every
    translator updates from 0 (the final one follows the last); none if the translator does not
    train."""
    if not (args.eval_every and args.updates):
        return False
    if phase == "inverse":
        return n == 0 < args.inv_updates
    return n % args.eval_every == 0 and n < args.updates


def totals(run: dict) -> dict:
    """Each model's updates: those of the checkpoint it started from and this run's."""
    return {k: run["before"][k] + run["progress"][k] for k in PHASES}


def phase_clocks(resume: Optional[dict], progress: dict) -> dict:
    """The run's wall time and each phase's Stopwatch clock, a resumed run's where it has them. A
    checkpoint from before the stopwatches has one flat clock and timed every update it counts."""
    clock = {"wall_time_s": 0.0}
    for k in PHASES:
        clock[k] = {"train_time_s": 0.0, "timed_updates": progress[k], "compile_time_s": 0.0}
    old = dict(resume["clock"]) if resume else {}
    if "inv_train_time_s" in old:
        clock["inverse"]["train_time_s"] = old.pop("inv_train_time_s")
        clock["translator"]["train_time_s"] = old.pop("train_time_s")
    return clock | old


def update_counts(counts: dict) -> str:
    return f"translator {counts['translator']}, inverse dynamics {counts['inverse']} updates"


def run_phase(phase: str, p: Phase, run: dict, run_eval, save, evaluated: set) -> None:
    """One phase from the updates it has done to its total. An update and its log line run whole
    before a stop signal takes effect; then the evaluation and the checkpoint, when due.
    `evaluated`: the (phase, step) evaluations a resumed run logged already."""
    args, progress, total = run["args"], run["progress"], p.total
    progress["phase"], done = phase, progress[phase]
    if eval_due(phase, done, args) and (phase, done) not in evaluated:
        run_eval(phase, done)
    every = args.eval_every if phase == "translator" else 0  # the evaluations save_due counts
    bar = tqdm(range(done, total), phase, total, initial=done, mininterval=1, disable=not total)
    # compiled on a CPU: the translator's state predictor alone (compiled_updates)
    compiled = args.compile and (phase == "translator" or run["device"].type == "cuda")
    timer = Stopwatch(run["clock"][phase], run["device"], COMPILE_WARMUP if compiled else 0)
    run["timer"] = timer  # save() ends its interval
    flag, what = PHASE_BATCH[phase]
    fresh = None if run["resume"] else run["dir"]  # removed if memory runs out before it logs
    oom = (flag, getattr(args, flag[2:].replace("-", "_")), run["device"], what, fresh)
    with bar:  # closed on a stop too
        for step in bar:
            with signals_deferred():
                timer.start()
                log = step % args.log_every == 0 or step + 1 == total
                with common.out_of_memory(*oom):  # one line naming the phase's batch flag
                    loss, grad_norm, lr = p.step(log)
                progress[phase] = done = step + 1
                timer.lap()
                if log:
                    timer.stop()  # waits for the device, as the log line's .item() would
                    line = {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr}
                    log_metrics(run["metrics"], phase=phase, step=step, **line)
                    bar.set_postfix(loss=f"{line['loss']:.4f}")
            if eval_due(phase, done, args):
                timer.stop()
                run_eval(phase, done)
            if save_due(done, total, every, args.save_every):
                save()


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


def compiled_updates(model, opt, inv_opt, device: torch.device, compile: bool):
    """--compile: the state predictor to pass the translator's update, and the two update
    functions. On CUDA each model's whole update (forward, backward, clipping) is compiled and
    replayed as CUDA graphs (mode reduce-overhead: the batches' shapes never change), which cuts the
    kernel launches that bound a small model's step; its optimizer step, one fused kernel that
    torch.compile does not trace, runs as it is between the graphs. On a CPU, where launches cost
    little, the state predictor alone."""
    if not compile:
        return model, update, update_inverse
    if device.type != "cuda":
        return torch.compile(model), update, update_inverse
    return model, graphed(update, opt), graphed(update_inverse, inv_opt)


def graphed(update_fn, opt):
    """update_fn compiled into CUDA graphs, the optimizer's step eager inside it."""
    opt.step = torch.compiler.disable(opt.step)  # one fused kernel; traced, it would only break
    compiled = torch.compile(update_fn, mode="reduce-overhead", dynamic=False)

    def step(*args, **kwargs):
        # a new step: the last one's outputs (read at its logging point) may now be overwritten
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return step


def fit(phases: dict, model, inv, frame: dict, run: dict, run_eval) -> None:
    """Both phases, from where a resumed run stopped; a stop signal saves a resumable checkpoint
    and exits with the command that continues."""
    progress, clock, resume = run["progress"], run["clock"], run["resume"]
    if resume:  # only the phase in progress has a state: the next starts fresh, as it would have
        p = phases[progress["phase"]]
        restore_training_state(resume, p.opt, p.sched, p.gen)

    def save() -> None:
        if "timer" in run:  # the interval ends first: the checkpoint's clock holds it
            run["timer"].stop()
        phase, wall = progress["phase"], clock["wall_time_s"] + time.time() - run["t_start"]
        p, clocks = phases[phase], clock | {"wall_time_s": wall}
        n, metrics = progress[phase], run["metrics"]
        state = training_state(n, p.opt, p.sched, p.gen, clocks, metrics)
        state["progress"] = dict(progress)
        save_atomic(make_checkpoint(model, inv, frame, totals(run), state), run["dir"] / "model.pt")

    logged = trim_metrics(run["metrics"], resume["metrics_lines"]) if resume else []
    evaluated = {(m["phase"], m["step"]) for m in logged if "eval_normalized" in m}
    try:
        for phase in list(PHASES)[list(PHASES).index(progress["phase"]) :]:
            run_phase(phase, phases[phase], run, run_eval, save, evaluated)
    except KeyboardInterrupt as stop:
        save()
        why, ckpt = str(stop) or "Ctrl-C", run["dir"] / "model.pt"
        raise SystemExit(
            f"interrupted ({why}): {ckpt} holds {update_counts(totals(run))}; continue with "
            f"`python {METHOD}.py --resume {run['dir']}`, or evaluate it with "
            f"`python {METHOD}.py --checkpoint {ckpt} --updates 0`."
        ) from None


@contextlib.contextmanager
def stops_reported(run: dict):
    """Stop signals raise KeyboardInterrupt inside (catch_stop_signals). fit saves and reports a
    stop in training; one in an evaluation-only run or in the final evaluation (the trained models
    are saved by then) ends here, in one line. The handlers are put back in any case."""
    old_handlers = catch_stop_signals()
    n, fresh = run["args"].eval_episodes, None if run["args"].resume else run["dir"]
    try:  # an allocation failure here, outside a training step (run_phase's), is an evaluation's
        with common.out_of_memory("--eval-episodes", n, run["device"], "an evaluation", fresh):
            yield
    except KeyboardInterrupt as stop:
        why, run_dir = str(stop) or "Ctrl-C", run["dir"]
        if not run["training"]:
            where = f"{run_dir} keeps its log"
            raise SystemExit(f"interrupted ({why}) during the evaluation; {where}.") from None
        raise SystemExit(
            f"interrupted ({why}) during the final evaluation; {run_dir / 'model.pt'} holds the "
            f"trained models; finish the run with `python {METHOD}.py --resume {run_dir}`."
        ) from None
    finally:
        restore_signals(old_handlers)


def evaluation_cost(facts: dict, n: int) -> str:
    """What an evaluation-only run is about to do, said before it starts (minutes on a CPU)."""
    probe = common.make_env(facts)
    horizon = probe.spec.max_episode_steps or 1000
    probe.close()
    return (
        f"evaluating only: {n} episodes of at most {horizon} steps ({n * horizon} environment "
        "steps at most, one batched forward of each model per step)"
    )


def finish(run: dict, res: dict) -> dict:
    """results.json (as if the run had never stopped), W&B's summary and the closing lines."""
    args, facts, progress, clock = run["args"], run["facts"], run["progress"], run["clock"]
    done = totals(run)
    wall = clock["wall_time_s"] + time.time() - run["t_start"]
    speed = {"bf16": run["bf16"], "wall_time_s": wall}
    compiled = sum(clock[phase]["compile_time_s"] for phase in PHASES)
    speed["compile_time_s"] = compiled if args.compile else None
    for phase, key in SPEED.items():  # training time only: no evaluation, save or compile
        timed, seconds = clock[phase]["timed_updates"], clock[phase]["train_time_s"]
        speed[key] = timed / seconds if timed and seconds else None
    counts = {"updates": progress["translator"], "trained_updates": done["translator"]}
    counts |= {"inv_updates": progress["inverse"], "trained_inv_updates": done["inverse"]}
    results = {**run["config"], **res, **counts, "run_dir": str(run["dir"]), **speed}
    (run["dir"] / "results.json").write_text(json.dumps(results, indent=2))
    finish_tracking(results)
    label = common.SOURCE_LABEL[facts["source"]]
    thesis = THESIS.get(facts["name"], "no number for this dataset")
    print(
        f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over "
        f"{args.eval_episodes} episodes ({label} data, {update_counts(done)}); thesis Table 2.1 "
        f"(RGDT, official D4RL, translator 150k, inverse dynamics 200k updates): {thesis}"
    )
    print(f"results: {run['dir'] / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
