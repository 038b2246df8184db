"""Trust Region Decision Transformer (thesis §1.4.2, Eq. 1.11-1.14, Alg. 1): the multi-objective DT of
§1.4.1 (Gaussian action, next-state and next-return heads, Eq. 1.3-1.10) with action-region tokens.

    python trdt.py --env hopper-medium-replay                                   # the project's headline run
    python trdt.py --env hopper-medium-replay --dataset-path ../shared/d4rl-replica/hopper-medium-replay.hdf5
    python trdt.py --env hopper-medium-replay --no-gaussian-heads               # Fig. 1.4a ablation (MSE heads)
    python trdt.py --env hopper-medium-replay --n-head 1                        # Fig. 1.4b ablation
    python trdt.py --env hopper-medium-replay --schedule alternating            # Chapter 3's sequential regime
    python trdt.py --env hopper-medium-replay --checkpoint runs/RUN/model.pt --updates 0 --attention   # Fig. 1.3

One file: arguments, action regions, data, model, losses, updates, evaluation, training, in the order the
thesis introduces them. Shared with the other method files is only common.py (dataset loading, env ids,
normalized scores). Where the thesis leaves a choice open, the choice is made next to the code, follows
../shared/design/thesis-map.md, and is printed at the start of every run (CHOICES below).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import time
from contextlib import nullcontext
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


@dataclass
class Args:
    env: str = "hopper-medium-replay"
    """dataset: a D4RL gym-mujoco name such as `hopper-medium-replay` (with or without `-v2`), or a Minari
    id such as `mujoco/hopper/medium-v0`"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official file;
    several are concatenated (medium + expert = medium-expert). Without it the official file is read from
    $D4RL_DATASET_DIR (default ~/.d4rl/datasets), downloaded there first if missing"""
    exp_name: str = "trdt"
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    bins: int = 3
    """b, action-region bins per action dimension (uniform over [-1, 1]); the region token is the ordinal
    encoding of length b per dimension, b * m_a bits in all (Eq. 1.12; Table 1.1: b = 3)"""
    lambdas: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    """loss weights on the simplex (Eq. 1.14), one per task in the order action, state, return, region;
    non-negative, summing to 1 (Table 1.1: uniform)"""
    gaussian_heads: bool = True
    """Gaussian NLL heads for the next state and next return (Eq. 1.5-1.8); `--no-gaussian-heads` trains those
    two with mean squared error instead (the Fig. 1.4a ablation). The action head stays Gaussian (Eq. 1.3-1.4)
    and the region head Bernoulli (Eq. 1.12)"""
    schedule: Literal["joint", "alternating"] = "joint"
    """`joint`: one optimizer step on sum_i lambda_i L_i per update (Eq. 1.14, Alg. 1 line 12);
    `alternating`: one step on each lambda_i L_i in turn, on the same batch (Chapter 3's sequential
    regime, Thm 3), so an update costs four forward/backward passes"""
    rtg_update: Literal["model", "subtract"] = "model"
    """next return-to-go at evaluation: `model` reads it from the return head (Eq. 1.16, Alg. 1 line 23);
    `subtract` uses DT's rule g_{t+1} = g_t - r_t"""
    grad_cos_every: int = 500
    """every N updates, log the pairwise cosine similarity of the task gradients on the shared parameters
    (everything but the four heads; Chapter 3's central quantity); 0 turns it off"""
    context_len: int = 20
    """K, the number of timesteps (each = return, state, region, action tokens) the transformer sees"""
    n_layer: int = 4
    """transformer blocks (Table 1.1)"""
    n_head: int = 4
    """attention heads per block (Table 1.1; 1 is the Fig. 1.4b ablation)"""
    n_embd: int = 256
    """embedding (hidden) size (Table 1.1)"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches"""
    timestep_embedding: bool = False
    """add a learned timestep embedding to every token of a step, as the DT paper does. Off by
    default: Table 1.1 says "positional embedding: No" (following ODT, whose code builds a timestep embedding
    but never uses it in forward)"""
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
    """gradient updates; 0 with --checkpoint only evaluates"""
    grad_clip: float = 0.25
    """clip the global gradient norm at this value (each task step's under --schedule alternating)"""
    rtg_scale: float = 1000.0
    """returns-to-go are divided by this before they enter the model"""
    target_return: Optional[float] = None
    """return to condition on at evaluation; default per domain (Table 1.2): hopper 7200, walker2d 10000,
    halfcheetah 12000"""
    eval_episodes: int = 10
    """episodes per evaluation, all run at once in a vector env"""
    eval_every: int = 10_000
    """evaluate before training and every N updates (0: only at the end)"""
    eval_async: bool = False
    """step the evaluation envs in subprocesses (gymnasium AsyncVectorEnv); pays off with many CPU cores"""
    compile: bool = False
    """torch.compile the model for training (CUDA)"""
    bf16: bool = True
    """bfloat16 autocast on CUDA (ignored on CPU)"""
    checkpoint: Optional[str] = None
    """a `model.pt` from an earlier run: start from its weights and architecture (bins, sizes, heads) instead
    of a new model; with `--updates 0` only evaluate it (e.g. with --attention), otherwise train it further
    with a fresh optimizer and warmup"""
    attention: bool = False
    """record attention during the final evaluation and write Fig. 1.3-style plots and numbers"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_every: int = 100
    """log the training losses (each task's separately) every N updates"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""


# Table 1.3, TRDT column (official D4RL v2, 10 seeds): mean and std of the normalized score.
THESIS_TABLE_1_3 = {
    "halfcheetah-medium": (43.20, 3.0), "hopper-medium": (65.89, 8.38), "walker2d-medium": (75.89, 7.26),
    "halfcheetah-medium-replay": (42.61, 2.0), "hopper-medium-replay": (97.82, 2.3), "walker2d-medium-replay": (86.94, 6.23),
    "halfcheetah-medium-expert": (94.37, 3.19), "hopper-medium-expert": (111.53, 1.31), "walker2d-medium-expert": (108.52, 0.45),
}
TABLE_1_1 = dict(bins=3, n_layer=4, n_head=4, n_embd=256, context_len=20, dropout=0.1, batch_size=256, lr=1e-4,
                 weight_decay=1e-3, grad_clip=0.25, warmup_steps=10_000, updates=100_000, gaussian_heads=True, timestep_embedding=False,
                 schedule="joint", rtg_update="model")  # plus uniform lambdas, LAMB, ReLU, no positional embedding
TARGET_RETURNS = {"hopper": 7200.0, "walker2d": 10000.0, "halfcheetah": 12000.0}  # Table 1.2
SOURCE_LABEL = {"d4rl": "official D4RL", "minari": "Minari", "replica": "replica", "file": "local file"}
MODALITIES = ("return", "state", "region", "action")  # token order within a timestep (Eq. 1.11)
TASKS = ("action", "state", "return", "region")  # the order of --lambdas (Eq. 1.14)
CHOICES = (
    "tokens per step (g_t, s_t, region_t, a_t) (Eq. 1.11); a_t and region_t are read off the s_t token, so a_t "
    "never conditions on its own region (§1.4.2); s_{t+1} and g_{t+1} are read off the a_t token (thesis-map.md)",
    "regions: b uniform bins over [-1, 1] per action dimension, a value on a bin edge goes to the upper bin, "
    "bin k -> k+1 leading ones of b bits (Eq. 1.12); decoded by counting leading bits > 0.5",
    "no positional embedding and no timestep embedding (Table 1.1; the ODT code builds one but never uses it); "
    "--timestep-embedding adds DT's",
    "LAMB as timm's (the ODT code's): bias-corrected moments, decay inside the uncapped trust ratio, eps 1e-8; "
    "timm's internal clip at norm 1.0 is left out (we clip at --grad-clip first)",
    "schedule alternating: per update one optimizer step on lambda_i L_i per task in turn (action, state, return, "
    "region), each on a fresh forward pass over the same batch; tasks with lambda_i = 0 are not stepped",
    "next-state loss skips the last step of each episode (its s_{t+1} is not in the data); g_{t+1} = g_t - r_t (0 at the end)",
)


# ---------------------------------------------------------------------------------------------------
# Action regions (Eq. 1.11-1.12): a coarse uniform grid over the action box, ordinally encoded.
# ---------------------------------------------------------------------------------------------------


def region_edges(bins: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The b - 1 inner bin boundaries -1 + 2k/b of [-1, 1], computed exactly and then rounded to the
    actions' dtype, so that e.g. float32(-1/3) is on the boundary (torch.linspace misses it by an ulp)."""
    return torch.tensor([-1.0 + 2.0 * k / bins for k in range(1, bins)], dtype=torch.float64).to(dtype=dtype, device=device)


def action_bins(actions: torch.Tensor, bins: int) -> torch.Tensor:
    """Bin index in 0..b-1 per action dimension. A value on a boundary goes to the upper bin; values
    outside [-1, 1] go to the outer bins, so -1 is bin 0 and +1 is bin b-1."""
    return torch.bucketize(actions.contiguous(), region_edges(bins, actions.dtype, actions.device), right=True)


def encode_regions(actions: torch.Tensor, bins: int) -> torch.Tensor:
    """(..., m_a) actions -> (..., b * m_a) ordinal bits: bin k is k+1 leading ones (Eq. 1.12). Unlike a
    one-hot code, neighbouring bins share bits, so the code keeps the order of the bins. (The first bit of
    each dimension is always 1; we keep it so the code is exactly the thesis's b bits per dimension.)"""
    k = action_bins(actions, bins)
    bits = torch.arange(bins, device=actions.device) <= k[..., None]
    return bits.flatten(-2).to(actions.dtype)


def decode_regions(probs: torch.Tensor, bins: int) -> torch.Tensor:
    """(..., b * m_a) bit probabilities -> (..., m_a) bin indices: threshold 0.5 (§1.4.2), then count the
    leading ones, so an inconsistent code like 1 0 1 reads as its valid prefix (bin 0)."""
    bits = (probs > 0.5).unflatten(-1, (-1, bins)).long()
    return (bits.cumprod(-1).sum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------------
# Data: trajectories as one set of flat tensors on the training device; a batch is an index gather.
# ---------------------------------------------------------------------------------------------------


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """g_t = sum_{t' >= t} r_t' (undiscounted, §1.3.1)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


def make_dataset(episodes: list[dict], device: torch.device, rtg_scale: float, max_ep_len: int, bins: int,
                 state_stats=None) -> dict:
    """`state_stats` (mean, std): normalise with these instead of the dataset's own (a checkpoint's, so
    that training on from it and evaluating it see states on the scale the model learnt)."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    mean, std = state_stats if state_stats is not None else (obs.mean(0), obs.std(0) + 1e-6)
    lengths = np.array([len(ep["rewards"]) for ep in episodes])
    rewards = np.concatenate([ep["rewards"] for ep in episodes])
    rtg = np.concatenate([returns_to_go(ep["rewards"]) for ep in episodes])
    t = lambda x, dtype=torch.float32: torch.as_tensor(x, dtype=dtype, device=device)
    actions = t(np.concatenate([ep["actions"] for ep in episodes]))
    return dict(
        states=t((obs - mean) / std),
        actions=actions,
        regions=encode_regions(actions, bins),  # Alg. 1 line 8: augment each trajectory with its regions
        rtg=t(rtg / rtg_scale),
        next_rtg=t((rtg - rewards) / rtg_scale),  # g_{t+1} = g_t - r_t, the target of Eq. 1.8
        is_last=t(np.isin(np.arange(len(obs)), np.cumsum(lengths) - 1), torch.bool),  # no s_{t+1} in the data here
        timesteps=t(np.concatenate([np.minimum(np.arange(n), max_ep_len - 1) for n in lengths]), torch.long),
        ep_start=t(np.concatenate([[0], np.cumsum(lengths)[:-1]]), torch.long),
        ep_len=t(lengths, torch.long),
        state_mean=mean, state_std=std,
    )


def sample_batch(data: dict, batch_size: int, K: int, gen: torch.Generator) -> dict:
    """Segments of K steps: the trajectory is drawn with probability proportional to its length, the start
    uniformly inside it. A segment that runs past the episode's end is left-padded (as in DT) so the last
    position is always real, like at evaluation; `mask` marks the real positions, `next_mask` those whose
    next state s_{t+1} is in the data (real and not the last step of the episode)."""
    ep = torch.multinomial(data["ep_len"].float(), batch_size, replacement=True, generator=gen)
    length = data["ep_len"][ep]
    start = (torch.rand(batch_size, generator=gen, device=length.device) * length).long()
    n_real = torch.clamp(length - start, max=K)
    offset = torch.arange(K, device=length.device) - (K - n_real)[:, None]  # (B, K), < 0 on padding
    mask = offset >= 0
    idx = data["ep_start"][ep, None] + start[:, None] + offset.clamp(min=0)
    next_mask = mask & ~data["is_last"][idx]
    nxt = (idx + 1).clamp(max=len(data["states"]) - 1)  # clamped index only ever lands under next_mask = False
    pad = lambda x, m=mask, i=idx: x[i] * m.view(*m.shape, *([1] * (x.dim() - 1)))
    return dict(states=pad(data["states"]), actions=pad(data["actions"]), regions=pad(data["regions"]),
                rtg=pad(data["rtg"])[..., None], next_rtg=pad(data["next_rtg"])[..., None],
                next_states=pad(data["states"], next_mask, nxt), timesteps=data["timesteps"][idx] * mask,
                mask=mask, next_mask=next_mask)


# ---------------------------------------------------------------------------------------------------
# Model: GPT over interleaved (g_t, s_t, region_t, a_t) tokens (Eq. 1.11) with four heads.
# ---------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, allowed, return_attn=False):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        if return_attn:  # explicit softmax, only for analysis: the weights themselves are the output
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            att = att.masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, nh, T, T)
            y = att @ v
        else:
            att = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y)), att


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2 layout, ReLU as in Table 1.1)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x, allowed, return_attn=False):
        y, att = self.attn(self.ln1(x), allowed, return_attn)
        x = x + y
        return x + self.mlp(self.ln2(x)), att


def gaussian_params(out: torch.Tensor, dim: int, gaussian: bool):
    """A head's output -> (mean, log-std), log-std None for an MSE head. The log-std is squashed into
    [-5, 2], the bounds the ODT code uses, so the NLL cannot run off to -inf on a constant target."""
    if not gaussian:
        return out, None
    mean, log_std = out.split(dim, dim=-1)
    return mean, -5.0 + 3.5 * (torch.tanh(log_std) + 1)


class TrustRegionDecisionTransformer(nn.Module):
    def __init__(self, state_dim, act_dim, n_layer, n_head, n_embd, dropout, max_ep_len, bins, gaussian_heads,
                 timestep_embedding=False):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} must be divisible by n_head {n_head}")
        self.state_dim, self.act_dim, self.bins, self.gaussian = state_dim, act_dim, bins, gaussian_heads
        # One linear embedding per modality. No positional embedding (Table 1.1): as in the ODT code, nothing
        # tells the tokens their time but the causal order; --timestep-embedding adds DT's timestep embedding.
        self.embed_t = nn.Embedding(max_ep_len, n_embd) if timestep_embedding else None
        self.embed_g = nn.Linear(1, n_embd)
        self.embed_s = nn.Linear(state_dim, n_embd)
        self.embed_r = nn.Linear(bins * act_dim, n_embd)
        self.embed_a = nn.Linear(act_dim, n_embd)
        self.embed_ln = nn.LayerNorm(n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # The heads are the task-specific parameters theta_DT, theta_s, theta_g, theta_abar (Eq. 1.9, 1.14);
        # everything else is shared. Names start with `head_` so the gradient analysis can tell them apart.
        g = 2 if gaussian_heads else 1  # Fig. 1.4a ablates the Gaussian heads "for states and returns" only
        self.head_action = nn.Linear(n_embd, 2 * act_dim)  # Eq. 1.3: always Gaussian
        self.head_region = nn.Linear(n_embd, bins * act_dim)  # Eq. 1.12: Bernoulli logits
        self.head_state = nn.Linear(n_embd, g * state_dim)  # Eq. 1.5
        self.head_return = nn.Linear(n_embd, g)  # Eq. 1.6

    def forward(self, rtg, states, regions, actions, timesteps, mask=None, return_attn=False) -> dict:
        """rtg (B, K, 1), states (B, K, m_s), regions (B, K, b*m_a), actions (B, K, m_a), timesteps (B, K),
        mask (B, K) bool or None. Returns a dict of per-step head outputs (B, K, .) and `attns`, the per-block
        attention weights (list of (B, nh, 4K, 4K)) when return_attn."""
        B, K, _ = states.shape
        t = 0.0 if self.embed_t is None else self.embed_t(timesteps)
        tokens = torch.stack([self.embed_g(rtg) + t, self.embed_s(states) + t, self.embed_r(regions) + t, self.embed_a(actions) + t], dim=2)
        x = self.drop(self.embed_ln(tokens.reshape(B, 4 * K, -1)))  # (B, 4K, C): g_1, s_1, r_1, a_1, g_2, ...
        allowed = torch.ones(4 * K, 4 * K, dtype=torch.bool, device=x.device).tril()  # causal
        if mask is not None:  # padded keys are hidden; every token still sees itself so no row is empty
            allowed = (allowed & mask.repeat_interleave(4, dim=1)[:, None, None, :]) | torch.eye(4 * K, dtype=torch.bool, device=x.device)
        attns = []
        for block in self.blocks:
            x, att = block(x, allowed, return_attn)
            attns.append(att)
        h = self.ln_f(x).reshape(B, K, 4, -1)
        # s_t has seen g_t, s_t but not region_t, a_t; a_t has seen all four. Alg. 1 line 19 and Eq. 1.12 write the
        # context of a_t and region_t as Gamma_t^+, but §1.4.2 says a_t must not condition on region_t, and with
        # region_t before a_t a region head on the a_t token would see its own target: both read s_t.
        h_s, h_a = h[:, :, 1], h[:, :, 3]
        a_mean, a_log_std = gaussian_params(self.head_action(h_s), self.act_dim, True)
        s_mean, s_log_std = gaussian_params(self.head_state(h_a), self.state_dim, self.gaussian)
        g_mean, g_log_std = gaussian_params(self.head_return(h_a), 1, self.gaussian)
        return dict(action_mean=torch.tanh(a_mean), action_log_std=a_log_std,  # tanh: actions live in [-1, 1]
                    region_logits=self.head_region(h_s),
                    state_mean=s_mean, state_log_std=s_log_std, return_mean=g_mean, return_log_std=g_log_std,
                    attns=attns)


# ---------------------------------------------------------------------------------------------------
# Losses (Eq. 1.4, 1.7, 1.8, 1.13) and their scalarization (Eq. 1.14)
# ---------------------------------------------------------------------------------------------------


def masked_mean(per_step: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over the positions where mask is True (the 1/K E[sum_k ...] of Eq. 1.4, padding excluded)."""
    mask = mask.float()
    return (per_step * mask).sum() / mask.sum().clamp(min=1.0)


def nll_loss(mean, log_std, target, mask):
    """Diagonal Gaussian NLL summed over dimensions (Eq. 1.4, 1.7, 1.8), or the mean squared error when
    log_std is None (the MSE heads of Fig. 1.4a, DT's l2 loss)."""
    mean, target = mean.float(), target.float()
    if log_std is None:
        per_step = ((mean - target) ** 2).mean(-1)
    else:
        log_std = log_std.float()
        per_step = (0.5 * ((target - mean) / log_std.exp()) ** 2 + log_std + 0.5 * math.log(2 * math.pi)).sum(-1)
    return masked_mean(per_step, mask)


def region_loss(logits, target, mask):
    """Multivariate Bernoulli NLL of the region bits (Eq. 1.12-1.13): binary cross-entropy summed over bits."""
    per_step = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum(-1)
    return masked_mean(per_step, mask)


def task_losses(model, batch: dict) -> tuple[dict, dict]:
    """One forward pass -> the four task losses (in TASKS order) and the model's outputs."""
    out = model(batch["rtg"], batch["states"], batch["regions"], batch["actions"], batch["timesteps"], batch["mask"])
    losses = {
        "action": nll_loss(out["action_mean"], out["action_log_std"], batch["actions"], batch["mask"]),  # Eq. 1.4
        "state": nll_loss(out["state_mean"], out["state_log_std"], batch["next_states"], batch["next_mask"]),  # Eq. 1.7
        # Eq. 1.8; g_{t+1} = g_t - r_t is defined at every real step, the episode's last one included
        "return": nll_loss(out["return_mean"], out["return_log_std"], batch["next_rtg"], batch["mask"]),
        "region": region_loss(out["region_logits"], batch["regions"], batch["mask"]),  # Eq. 1.13
    }
    return losses, out


def region_accuracy(logits, regions, mask, bins) -> float:
    """Share of (real step, action dimension) pairs whose decoded predicted bin is the true bin."""
    hit = (decode_regions(logits.sigmoid(), bins) == decode_regions(regions, bins)).float().mean(-1)
    return masked_mean(hit, mask).item()


def shared_parameters(model) -> list:
    """Everything but the task heads: the parameters all four tasks compete for (Chapter 3)."""
    return [p for n, p in model.named_parameters() if not n.startswith("head_") and p.requires_grad]


def optimizer_step(model, opt, loss, grad_clip: float) -> torch.Tensor:
    """Backward, clip the global gradient norm, step; returns the norm before clipping. Gradients are
    reset to None, so a head that the loss does not reach gets neither a step nor weight decay."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return grad_norm


def update(model, opt, batch: dict, lambdas, schedule: str, grad_clip: float, autocast=nullcontext()) -> tuple[dict, torch.Tensor, dict]:
    """One training update. `joint`: one step on sum_i lambda_i L_i (Eq. 1.14, Alg. 1 line 12).
    `alternating`: one step on lambda_i L_i for each task in turn, each on a fresh forward pass over the
    same batch, i.e. the sequential regime of Chapter 3 (Thm 3: for gradient descent it equals the joint
    step up to O(eta^2) terms). With LAMB every step has a normalised size, so an alternating update moves
    the weights further than a joint one: that is part of what the regime is. Returns the task losses
    (detached; under `alternating` each as measured just before its own step), the gradient norm before
    clipping (the mean over task steps under `alternating`), and the last forward's outputs."""
    if schedule == "joint":
        with autocast:
            losses, out = task_losses(model, batch)
        grad_norm = optimizer_step(model, opt, sum(w * losses[k] for k, w in zip(TASKS, lambdas)), grad_clip)
        return {k: v.detach() for k, v in losses.items()}, grad_norm, out
    measured, norms = {}, []
    for task, w in zip(TASKS, lambdas):
        with autocast:
            losses, out = task_losses(model, batch)
        measured[task] = losses[task].detach()
        if w == 0:  # a task switched off takes no step (LAMB's momentum would still move the weights)
            continue
        norms.append(optimizer_step(model, opt, w * losses[task], grad_clip))
    return measured, torch.stack(norms).mean(), out


def task_gradient_cosines(model, losses: dict) -> dict:
    """Cosine similarity of each pair of task gradients on the shared parameters (`cos_{task}_{task}`), and
    each gradient's norm (`grad_norm_{task}`): Chapter 3's central quantity (§3.6-3.7), same keys as mo_dt.py.
    The losses are unweighted: the cosine ignores lambda anyway."""
    shared = shared_parameters(model)
    grads = {}
    for task, loss in losses.items():
        g = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)  # K = 1: action, region never reach embed_a
        grads[task] = torch.cat([(torch.zeros_like(p) if gi is None else gi).flatten() for gi, p in zip(g, shared)]).float()
    out = {f"grad_norm_{k}": v.norm().item() for k, v in grads.items()}
    out.update({f"cos_{a}_{b}": F.cosine_similarity(grads[a], grads[b], dim=0).item() for a, b in itertools.combinations(TASKS, 2)})
    return out


# ---------------------------------------------------------------------------------------------------
# Evaluation (Alg. 1, inference): all episodes at once in a vector env, batched forwards per env step.
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, info, state_mean, state_std, args, device, seed, record_attention=False) -> dict:
    import gymnasium as gym

    n, K = args.eval_episodes, args.context_len
    vec = gym.vector.AsyncVectorEnv if args.eval_async else gym.vector.SyncVectorEnv
    envs = vec([lambda: common.make_env(info)] * n)
    probe = common.make_env(info)
    horizon = probe.spec.max_episode_steps or 1000  # the TimeLimit: 1000 for MuJoCo
    probe.close()
    low, high = (torch.as_tensor(b[0], device=device) for b in (envs.action_space.low, envs.action_space.high))
    mean_t, std_t = torch.as_tensor(state_mean, device=device), torch.as_tensor(state_std, device=device)
    states = torch.zeros(n, horizon, info["obs_dim"], device=device)
    actions = torch.zeros(n, horizon, info["act_dim"], device=device)
    regions = torch.zeros(n, horizon, args.bins * info["act_dim"], device=device)
    rtg = torch.zeros(n, horizon, 1, device=device)
    timesteps = torch.arange(horizon, device=device).clamp(max=args.max_ep_len - 1).expand(n, -1)
    rtg[:, 0] = args.target_return / args.rtg_scale
    returns, lengths = np.zeros(n), np.zeros(n, dtype=int)
    done = np.zeros(n, dtype=bool)
    attn = AttentionRecorder(len(model.blocks), model.blocks[0].attn.n_head, K) if record_attention else None
    model.eval()
    obs, _ = envs.reset(seed=seed)
    t0 = time.time()
    for t in range(horizon):
        states[:, t] = (torch.as_tensor(obs, device=device, dtype=torch.float32) - mean_t) / std_t
        ctx = slice(max(0, t - K + 1), t + 1)  # the last K steps; at the start the sequence is simply shorter
        context = lambda: (rtg[:, ctx], states[:, ctx], regions[:, ctx], actions[:, ctx], timesteps[:, ctx])
        record = attn is not None and t + 1 >= K
        # Alg. 1 line 19: region_t and a_t are still zeros here; the s_t token that predicts a_t cannot see them.
        out = model(*context(), return_attn=record)
        a = torch.maximum(torch.minimum(out["action_mean"][:, -1].float(), high), low)
        if record:
            attn.add(out["attns"], ~torch.as_tensor(done, device=device))
        actions[:, t] = a
        regions[:, t] = encode_regions(a, args.bins)  # Alg. 1 line 20: the region of the executed action
        obs, r, term, trunc, _ = envs.step(a.cpu().numpy())
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        if done.all() or t + 1 == horizon:  # no slot for g_{t+1} past the horizon
            break
        if args.rtg_update == "model":
            # Eq. 1.16, Alg. 1 line 23: g_{t+1} from the return head, which reads the a_t token; a_t is known
            # only now, hence a second forward pass per env step.
            rtg[:, t + 1] = model(*context())["return_mean"][:, -1].float()
        else:
            rtg[:, t + 1] = rtg[:, t] - torch.as_tensor(r, device=device, dtype=torch.float32)[:, None] / args.rtg_scale  # DT's rule
    envs.close()
    model.train()
    score = common.normalized_score(info, returns)
    return dict(returns=returns.tolist(), lengths=lengths.tolist(), normalized=score.tolist(),
                return_mean=float(returns.mean()), normalized_mean=float(score.mean()), normalized_std=float(score.std()),
                env_steps_per_s=float(lengths.sum() / (time.time() - t0)), attention=attn)


class AttentionRecorder:
    """Running sums of attention from state tokens (the rows that predict actions) during evaluation:
    per block the map over the whole context (Fig. 1.3 top), per block and head the mass on each
    modality (Fig. 1.3 bottom), and per head the entropy of the attention rows."""

    def __init__(self, n_layer, n_head, K, modalities=MODALITIES):
        self.modalities, self.K, self.count = modalities, K, 0
        M = len(modalities)
        self.rows = torch.arange(K) * M + modalities.index("state")  # state-token positions
        self.maps = torch.zeros(n_layer, K, M * K)
        self.mass = torch.zeros(n_layer, n_head, M)
        self.entropy = torch.zeros(n_layer, n_head)

    def add(self, atts, alive):
        M = len(self.modalities)
        for i, att in enumerate(atts):
            a = att[alive][:, :, self.rows.to(att.device)].float().cpu()  # (N, nh, K, MK)
            self.maps[i] += a.mean(1).sum(0)
            self.mass[i] += a.view(*a.shape[:3], self.K, M).sum(3).mean(2).sum(0)
            self.entropy[i] += -(a * a.clamp_min(1e-12).log()).sum(-1).mean(-1).sum(0)
        self.count += int(alive.sum())

    def report(self, out_dir: Path, title: str) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        c = max(self.count, 1)
        maps, mass, ent = self.maps / c, self.mass / c, self.entropy / c
        L, M = maps.shape[0], len(self.modalities)
        summary = dict(modalities=list(self.modalities), samples=self.count,
                       state_row_maps=maps.tolist(),
                       modality_mass_mean=mass.mean(1).tolist(), modality_mass_std_across_heads=mass.std(1, unbiased=False).tolist(),
                       modality_mass_per_head=mass.tolist(), entropy_per_head=ent.tolist(),
                       entropy_uniform_reference=float(np.mean([math.log(M * k + 2) for k in range(self.K)])))
        fig, ax = plt.subplots(3, L, figsize=(3.6 * L, 9), squeeze=False)
        labels = [f"{m[0]}{k + 1}" for k in range(self.K) for m in self.modalities]
        for i in range(L):
            ax[0, i].imshow(maps[i], aspect="auto", cmap="viridis")
            ax[0, i].set_title(f"block {i + 1}: state rows")
            ax[0, i].set_xticks(range(0, M * self.K, M), labels[::M], rotation=90, fontsize=6)
            ax[1, i].bar(self.modalities, mass[i].mean(0), yerr=mass[i].std(0, unbiased=False), capsize=3)
            ax[1, i].set_ylim(0, 1)
            ax[1, i].set_title("mean attention per modality")
            ax[2, i].bar(range(1, ent.shape[1] + 1), ent[i])
            ax[2, i].set_title("entropy per head (nats)")
            ax[2, i].set_xlabel("head")
        if not self.count:  # attention is recorded only at steps with a full context of K steps
            title += f" (EMPTY: every episode ended before step {self.K})"
            print(f"warning: no attention recorded: every evaluation episode ended before step K = {self.K}.")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out_dir / "attention.png", dpi=110)
        plt.close(fig)
        (out_dir / "attention.json").write_text(json.dumps(summary))
        return summary


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2020; Table 1.1, Alg. 1 line 12) as timm's `Lamb`, the one the ODT code, and so the
    thesis, used: Adam moments with bias correction, the weight decay added to the Adam update, and each
    tensor's step scaled by its trust ratio ||w|| / ||update|| (1 where either norm is 0), uncapped. Written
    out because timm pulls torchvision and pytorch-optimizer's Lamb is another variant (no bias correction,
    ||w|| capped at 10 in the ratio). timm's clip of the global gradient norm at 1.0 is left out: we clip at
    --grad-clip (0.25) before every step, which leaves it nothing to do. The trust ratio scales every tensor,
    decayed or not: ODT passed one parameter group with decay, so timm adapted every tensor there too."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (beta1, beta2), step = group["betas"], group.get("step", 0) + 1
            group["step"] = step  # one count per group, as in timm (a head without a gradient skips, the count not)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                update = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + group["eps"])
                update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                p.sub_(update * (trust * group["lr"]))


def make_optimizer(model, args):
    """LAMB (Table 1.1) with weight decay on matrices only, as in nanoGPT, and eps 1e-8 as the ODT code."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    opt = Lamb(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps)))
    return opt, sched


def check_args(args: Args) -> None:
    positive = dict(context_len=args.context_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                    batch_size=args.batch_size, eval_episodes=args.eval_episodes, max_ep_len=args.max_ep_len,
                    rtg_scale=args.rtg_scale, lr=args.lr, log_every=args.log_every, grad_clip=args.grad_clip)
    for name, v in positive.items():
        if v <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0 (got {v}).")
    if args.updates < 0 or args.eval_every < 0 or args.warmup_steps < 0 or args.grad_cos_every < 0 or not 0 <= args.dropout < 1:
        raise SystemExit("error: --updates, --eval-every, --warmup-steps, --grad-cos-every must be >= 0 and --dropout in [0, 1).")
    if args.weight_decay < 0:
        raise SystemExit(f"error: --weight-decay must be >= 0 (got {args.weight_decay}).")
    if args.n_embd % args.n_head:  # checked here, before the run folder is made
        raise SystemExit(f"error: --n-embd {args.n_embd} must be divisible by --n-head {args.n_head}.")
    if args.updates == 0 and args.checkpoint is None:
        raise SystemExit("error: --updates 0 trains nothing; pass --checkpoint runs/RUN/model.pt to evaluate a trained model.")
    if args.bins < 2:
        raise SystemExit(f"error: --bins must be >= 2 (got {args.bins}); one bin makes every region the same.")
    check_lambdas(args.lambdas)


def check_lambdas(lambdas) -> None:
    """Eq. 1.14: one weight per task, on the simplex."""
    lam = np.asarray(lambdas, dtype=float)
    if lam.shape != (len(TASKS),):
        raise SystemExit(f"error: --lambdas needs {len(TASKS)} weights, one per task ({', '.join(TASKS)}); got {len(lam)}.")
    if not np.all(np.isfinite(lam)) or np.any(lam < 0) or abs(lam.sum() - 1.0) > 1e-6:
        raise SystemExit(f"error: --lambdas {list(lambdas)} must be non-negative and sum to 1 (they sum to {lam.sum():g}); "
                         "e.g. --lambdas 0.25 0.25 0.25 0.25.")


def attention_mass_text(attention: dict) -> str:
    return "; ".join(f"block {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in zip(MODALITIES, m))
                     for i, m in enumerate(attention["modality_mass_mean"]))


def later_blocks_verdict(attention: dict, favoured: tuple) -> str:
    """Every block after the first puts more attention mass on the `favoured` modalities together than on any
    other modality: reproduced; only the last block does: partly; else not reproduced."""
    if not attention["samples"]:
        return "not measured: no evaluation step had a full context of K steps"
    if len(attention["modality_mass_mean"]) < 2:
        return "not measured: one block has no later blocks"
    wins = []
    for mass in attention["modality_mass_mean"][1:]:
        m = dict(zip(MODALITIES, mass))
        wins.append(sum(m[k] for k in favoured) > max(v for k, v in m.items() if k not in favoured))
    return "reproduced" if all(wins) else ("partly" if wins[-1] else "not reproduced")


def claims_table(args: Args, trained_with: dict, trained_updates: int, info: dict, res: dict, attention: Optional[dict],
                 cosines: list[dict]) -> list[dict]:
    """thesis claim | our measurement | verdict, for what one run can test, with the same rules as mo_dt.py.
    Score: within one of the thesis's standard deviations across its 10 seeds is reproduced, within two
    partly; a model trained with other settings than Table 1.1 is "not comparable". `trained_with`: the
    arguments the evaluated model was trained with (a checkpoint's, or this run's)."""
    rows = []
    # The inference settings are this run's; a checkpoint from before --timestep-embedding existed had one.
    config = dict(trained_with, updates=trained_updates, rtg_update=args.rtg_update, target_return=args.target_return,
                  timestep_embedding=trained_with.get("timestep_embedding", True))
    short = f" (model trained {trained_updates} updates, thesis 10^5)" if trained_updates != TABLE_1_1["updates"] else ""
    label = SOURCE_LABEL[info["source"]]
    if info["name"] in THESIS_TABLE_1_3:
        mean, std = THESIS_TABLE_1_3[info["name"]]
        differs = [k for k, v in TABLE_1_1.items() if config.get(k) != v]
        table_1_2 = TARGET_RETURNS.get(info["name"].split("-")[0])
        differs += [] if config["target_return"] in (None, table_1_2) else ["target_return (Table 1.2)"]  # None: the default
        differs += [] if np.allclose(config["lambdas"], 1 / len(TASKS)) else ["lambdas"]
        gap = abs(res["normalized_mean"] - mean)
        if differs:
            verdict = f"not comparable: differs from Table 1.1 in {', '.join(differs)}"
        else:
            verdict = "reproduced" if gap <= std else ("partly" if gap <= 2 * std else "not reproduced")
        if info["source"] != "d4rl":
            verdict += f" ({label} data, not the thesis's files)"
        rows.append(dict(claim=f"Table 1.3 TRDT {info['name']}: {mean:.2f} ± {std:.2f} (official D4RL, 10 seeds, 10^5 updates)",
                         ours=f"{res['normalized_mean']:.2f} ± {res['normalized_std']:.2f} over {args.eval_episodes} episodes, "
                              f"seed {config['seed']}, {trained_updates} updates, {label} data, rtg-update {args.rtg_update}",
                         verdict=verdict))
    if attention is not None:  # §1.5.2: later blocks engage predominantly with actions, "divided between action regions and action tokens"
        rows.append(dict(claim="Fig. 1.3, §1.5.2: later blocks attend predominantly to action and region tokens over state and return tokens",
                         ours=attention_mass_text(attention), verdict=later_blocks_verdict(attention, ("action", "region")) + short))
    if len(cosines) >= 2:
        pairs = [k for k in cosines[0] if k.startswith("cos_")]
        fell = [k for k in pairs if cosines[-1][k] < cosines[0][k]]
        rows.append(dict(claim="Ch. 3 (§3.4, §3.7): gradient descent drives the task gradients toward disagreement (cosine falls)",
                         ours=f"{args.schedule}, update {cosines[0]['step']} -> {cosines[-1]['step']}: "
                              + ", ".join(f"{k[4:]} {cosines[0][k]:+.2f} -> {cosines[-1][k]:+.2f}" for k in pairs)
                              + " (one minibatch each)",
                         verdict="reproduced" if len(fell) == len(pairs) else ("partly" if fell else "not reproduced")))
    return rows


def train(args: Args) -> dict:
    t_start = time.time()
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    except RuntimeError:
        raise SystemExit(f"error: --device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: this torch sees no CUDA GPU; use --device cpu (or auto).")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    ckpt = None
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file (expected runs/RUN/model.pt).")
        try:
            ckpt = torch.load(args.checkpoint, map_location=device, weights_only=False)
        except Exception as e:
            raise SystemExit(f"error: --checkpoint {args.checkpoint}: torch cannot read it ({type(e).__name__}).") from None
        arch = ("bins", "gaussian_heads", "context_len", "n_layer", "n_head", "n_embd", "max_ep_len", "rtg_scale")
        if not isinstance(ckpt, dict) or "model" not in ckpt or any(k not in ckpt.get("args", {}) for k in arch):
            raise SystemExit(f"error: --checkpoint {args.checkpoint} is not a model.pt written by trdt.py.")
        for k in arch:
            setattr(args, k, ckpt["args"][k])  # the architecture is the checkpoint's, whatever the flags say
        args.timestep_embedding = "embed_t.weight" in ckpt["model"]
    try:
        episodes, info = common.load_dataset(args.env, args.dataset_path)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if ckpt is not None:
        dims = (ckpt["dataset"]["obs_dim"], ckpt["dataset"]["act_dim"])
        if dims != (info["obs_dim"], info["act_dim"]):
            raise SystemExit(f"error: --checkpoint {args.checkpoint} was trained on {ckpt['dataset']['name']} (state, action dims {dims}) "
                             f"but --env {args.env} has {(info['obs_dim'], info['act_dim'])}; pass the --env it was trained on.")
    domain = info["env_id"].split("-")[0].lower()
    if args.target_return is None:
        if domain not in TARGET_RETURNS:
            raise SystemExit(f"error: no default target return for {info['env_id']}; pass --target-return.")
        args.target_return = TARGET_RETURNS[domain]

    run_name = f"{info['name'].replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.runs_dir) / run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise SystemExit(f"error: run folder {run_dir} already exists; refusing to overwrite it. Wait a second or change --exp-name.") from None
    config = dict(args=asdict(args), dataset=info, device=str(device), git_commit=git_commit(), torch=torch.__version__, run_name=run_name)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    metrics = open(run_dir / "metrics.jsonl", "a")

    def log(**kw):  # flushed line by line: a run killed by a time limit or Ctrl-C keeps its history
        metrics.write(json.dumps(kw) + "\n")
        metrics.flush()


    data = make_dataset(episodes, device, args.rtg_scale, args.max_ep_len, args.bins,
                        state_stats=None if ckpt is None else (ckpt["state_mean"], ckpt["state_std"]))
    model = TrustRegionDecisionTransformer(info["obs_dim"], info["act_dim"], args.n_layer, args.n_head, args.n_embd,
                                           args.dropout, args.max_ep_len, args.bins, args.gaussian_heads,
                                           args.timestep_embedding).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    opt, sched = make_optimizer(model, args)
    fwd = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"run {run_name}: {info['transitions']} transitions in {info['episodes']} episodes ({info['source']}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}, "
          f"schedule {args.schedule}, lambdas {list(args.lambdas)}, rtg update {args.rtg_update}")
    print("interpretation choices:\n" + "\n".join(f"  - {c}" for c in CHOICES))

    def run_eval(step, record_attention=False):
        res = evaluate(model, info, data["state_mean"], data["state_std"], args, device, seed=args.seed + 10_000, record_attention=record_attention)
        log(step=step, eval_return=res["return_mean"], eval_normalized=res["normalized_mean"], eval_normalized_std=res["normalized_std"])
        return res

    if args.eval_every and args.updates:
        print(f"update 0: normalized score {run_eval(0)['normalized_mean']:.1f}")
    cosines = []
    t_train, step, aside = time.time(), 0, 0.0  # aside: seconds of evaluation and gradient analysis, not training
    bar = tqdm(range(args.updates), desc="train", dynamic_ncols=True, mininterval=1.0, disable=args.updates == 0)
    for step in bar:
        b = sample_batch(data, args.batch_size, args.context_len, gen)
        if args.grad_cos_every and (step % args.grad_cos_every == 0 or step == args.updates - 1):
            t0 = time.time()
            with autocast:  # an extra forward pass on this update's batch, before its step
                losses, _ = task_losses(fwd, b)
            cosines.append(dict(step=step, **task_gradient_cosines(model, losses)))
            log(**cosines[-1])
            aside += time.time() - t0
        losses, grad_norm, out = update(fwd, opt, b, args.lambdas, args.schedule, args.grad_clip, autocast)
        sched.step()
        if step % args.log_every == 0 or step == args.updates - 1:  # .item() syncs the GPU: not every step
            task = {f"loss_{k}": v.item() for k, v in losses.items()}
            total = sum(w * task[f"loss_{k}"] for k, w in zip(TASKS, args.lambdas))
            log(step=step, loss=total, **task, grad_norm=grad_norm.item(), lr=sched.get_last_lr()[0],
                region_acc=region_accuracy(out["region_logits"], b["regions"], b["mask"], args.bins))
            bar.set_postfix(loss=f"{total:.4f}", action=f"{task['loss_action']:.3f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.updates:
            t0 = time.time()
            res = run_eval(step + 1)
            aside += time.time() - t0
            bar.write(f"update {step + 1}: normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f}")
    train_time = time.time() - t_train - aside
    updates_per_s = args.updates / train_time if args.updates else None  # updates alone: comparable across --eval-every

    trained_updates = args.updates + (ckpt.get("trained_updates", ckpt["args"]["updates"]) if ckpt is not None else 0)
    if args.updates:
        torch.save(dict(model=model.state_dict(), args=asdict(args), state_mean=data["state_mean"], state_std=data["state_std"],
                        dataset=info, trained_updates=trained_updates), run_dir / "model.pt")
    res = run_eval(args.updates, record_attention=args.attention)
    attn = res.pop("attention")
    attention = attn.report(run_dir, f"TRDT on {info['name']}: attention from state tokens") if attn is not None else None
    trained_with = ckpt["args"] if ckpt is not None and not args.updates else asdict(args)
    claims = claims_table(args, trained_with, trained_updates, info, res, attention, cosines)
    results = dict(config, returns=res["returns"], lengths=res["lengths"], normalized=res["normalized"],
                   return_mean=res["return_mean"], normalized_mean=res["normalized_mean"], normalized_std=res["normalized_std"],
                   updates=args.updates, trained_updates=trained_updates, train_updates_per_s=updates_per_s, eval_env_steps_per_s=res["env_steps_per_s"],
                   wall_time_s=time.time() - t_start, run_dir=str(run_dir), claims=claims, choices=list(CHOICES))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    metrics.close()

    print(f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over {args.eval_episodes} episodes "
          f"(return {res['return_mean']:.0f}; {SOURCE_LABEL[info['source']]} data, {trained_updates} updates, rtg update {args.rtg_update})")
    if claims:
        print("thesis claim | ours | verdict")
        for c in claims:
            print(f"{c['claim']} | {c['ours']} | {c['verdict']}")
    print(f"results: {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
