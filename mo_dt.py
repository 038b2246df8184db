"""Multi-Objective Decision Transformer (thesis §1.4.1, §1.4.3, Eq. 1.3-1.10, Alg. 1): DT trained to predict
the action, the next state and the next return-to-go at once, with one linear scalarization of the three losses.

    python mo_dt.py --env hopper-medium-replay                              # Table 1.3's MO-DT column
    python mo_dt.py --env hopper-medium-replay --no-gaussian-heads          # Fig. 1.4a: MSE heads
    python mo_dt.py --env hopper-medium-replay --n-head 1                   # Fig. 1.4b: one attention head
    python mo_dt.py --env hopper-medium-replay --schedule alternating       # Chapter 3's sequential regime
    python mo_dt.py --env hopper-medium-replay --rtg-update subtract        # DT's return rule at inference
    python mo_dt.py --checkpoint runs/RUN/model.pt --updates 0 --attention  # Fig. 1.2

One file: arguments, data, model, losses, evaluation, training, in the order the thesis introduces them.
Shared with the other method files is only common.py (dataset loading, env ids, normalized scores).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
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


@dataclass
class Args:
    env: str = "hopper-medium-replay"
    """dataset: a D4RL gym-mujoco name such as `hopper-medium-replay` (with or without `-v2`), or a Minari
    id such as `mujoco/hopper/medium-v0`"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official file;
    several are concatenated (medium + expert = medium-expert). Without it the official file is read from
    $D4RL_DATASET_DIR (default ~/.d4rl/datasets), downloaded there first if missing"""
    exp_name: str = "mo_dt"
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    lambdas: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    """loss weights (lambda_DT, lambda_s, lambda_g) of Eq. 1.9, on the simplex of Eq. 1.10 (non-negative,
    summing to 1); Table 1.1: uniform"""
    gaussian_heads: bool = True
    """Gaussian NLL heads for the next state and next return (Eq. 1.5-1.8); `--no-gaussian-heads` trains those
    two with mean squared error instead (the Fig. 1.4a ablation). The action head stays Gaussian (Eq. 1.3-1.4)"""
    schedule: Literal["joint", "alternating"] = "joint"
    """`joint`: one optimizer step on sum_i lambda_i L_i per update (Eq. 1.9, Alg. 1 line 12); `alternating`:
    one step on lambda_i L_i for each task in turn on the same batch (the sequential regime of Ch. 3, Thm 3)"""
    rtg_update: Literal["model", "subtract"] = "model"
    """next return-to-go at evaluation: `model` predicts it with the return head (Eq. 1.16, Alg. 1 line 23);
    `subtract` is DT's rule g_{t+1} = g_t - r_t"""
    grad_cos_every: int = 500
    """every N updates log the cosine between the task gradients on the shared parameters (Ch. 3's central
    quantity); 0 turns it off"""
    context_len: int = 20
    """K, the number of timesteps (each = return, state, action tokens) the transformer sees (Eq. 1.2)"""
    n_layer: int = 4
    """transformer blocks (Table 1.1)"""
    n_head: int = 4
    """attention heads per block (Table 1.1; 1 for the Fig. 1.4b ablation)"""
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
    """clip the global gradient norm at this value (before every optimizer step)"""
    rtg_scale: float = 1000.0
    """returns-to-go are divided by this before they enter the model"""
    target_return: Optional[float] = None
    """return to condition on at evaluation; default Table 1.2: hopper 7200, walker2d 10000, halfcheetah 12000"""
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
    """a `model.pt` from an earlier run: start from its weights and architecture (sizes, heads) instead of a
    new model; with `--updates 0` only evaluate it (e.g. with --attention), otherwise train it further with a
    fresh optimizer and warmup"""
    attention: bool = False
    """record attention during the final evaluation and write Fig. 1.2-style plots and numbers"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_every: int = 100
    """log the training loss, each task loss and the learning rate every N updates"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""


# Table 1.3, MO-DT column (official D4RL v2, mean ± std over 10 seeds, 10^5 updates), for printing beside ours.
THESIS_TABLE_1_3 = {
    "halfcheetah-medium": (43.34, 3.34), "hopper-medium": (67.45, 11.21), "walker2d-medium": (78.56, 6.30),
    "halfcheetah-medium-replay": (40.93, 2.13), "hopper-medium-replay": (79.43, 5.2), "walker2d-medium-replay": (81.3, 9.72),
    "halfcheetah-medium-expert": (94.57, 2.78), "hopper-medium-expert": (111.71, 1.52), "walker2d-medium-expert": (108.08, 0.54),
}  # total 705.37
TABLE_1_1 = dict(n_layer=4, n_head=4, n_embd=256, context_len=20, dropout=0.1, batch_size=256, lr=1e-4,
                 weight_decay=1e-3, grad_clip=0.25, warmup_steps=10_000, updates=100_000, gaussian_heads=True, timestep_embedding=False,
                 schedule="joint", rtg_update="model")
TARGET_RETURNS = {"hopper": 7200.0, "walker2d": 10000.0, "halfcheetah": 12000.0}  # Table 1.2
SOURCE_LABEL = {"d4rl": "official D4RL", "minari": "Minari", "replica": "replica", "file": "local file"}
MODALITIES = ("return", "state", "action")  # token order within a timestep (Eq. 1.1)
TASKS = ("action", "state", "return")  # the order of lambda = [lambda_DT, lambda_s, lambda_g] (Eq. 1.9)

# Where the thesis leaves a choice open (../shared/design/thesis-map.md); printed at the start of every run.
CHOICES = (
    "heads: a_t is read off the s_t token (Eq. 1.3); s_{t+1} and g_{t+1} off the a_t token (Eq. 1.5-1.8 say "
    "'given Gamma_{t-1}'; Eq. 1.16 predicts g_2 from {g_1, s_1, a_1})",
    "no positional embedding and no timestep embedding (Table 1.1; the ODT code builds one but never uses it); "
    "--timestep-embedding adds DT's",
    "next-state targets are masked where t is the last step of its stored episode (no s_{t+1} in the data); "
    "g_{t+1} = g_t - r_t is 0 after the last step",
    "LAMB as timm's (the ODT code's): bias-corrected moments, decay inside the uncapped trust ratio, eps 1e-8; "
    "timm's internal clip at norm 1.0 is left out (we clip at --grad-clip first)",
    "--schedule alternating: one update = one step of the same LAMB optimizer per task, in the order (DT, s, g), "
    "each on a fresh forward pass of the same batch; LAMB's trust ratio sets each step's size, so the shared "
    "weights move up to 3x as far per update as under joint, and the moment buffers are shared across tasks",
)


# ---------------------------------------------------------------------------------------------------
# Data: trajectories as one set of flat tensors on the training device; a batch is an index gather.
# ---------------------------------------------------------------------------------------------------


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """g_t = sum_{t' >= t} r_t' (undiscounted, §1.3.1)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


def make_dataset(episodes: list[dict], device: torch.device, rtg_scale: float, max_ep_len: int, state_stats=None) -> dict:
    """`state_stats` (mean, std): normalise with these instead of the dataset's own (a checkpoint's, so
    that training on from it and evaluating it see states on the scale the model learnt)."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    mean, std = state_stats if state_stats is not None else (obs.mean(0), obs.std(0) + 1e-6)
    lengths = np.array([len(ep["rewards"]) for ep in episodes])
    rtg = [returns_to_go(ep["rewards"]) for ep in episodes]
    t = lambda x, dtype=torch.float32: torch.as_tensor(x, dtype=dtype, device=device)
    return dict(
        states=t((obs - mean) / std),
        actions=t(np.concatenate([ep["actions"] for ep in episodes])),
        rtg=t(np.concatenate(rtg) / rtg_scale),
        # Eq. 1.8's target g_{t+1}: the next entry of the same episode, 0 after its last step (nothing is left to earn)
        next_rtg=t(np.concatenate([np.append(g[1:], 0.0) for g in rtg]) / rtg_scale),
        # Eq. 1.7's target s_{t+1} exists in the flat arrays at index + 1, except after an episode's last step
        has_next=t(np.concatenate([np.arange(n) < n - 1 for n in lengths]), torch.bool),
        timesteps=t(np.concatenate([np.minimum(np.arange(n), max_ep_len - 1) for n in lengths]), torch.long),
        ep_start=t(np.concatenate([[0], np.cumsum(lengths)[:-1]]), torch.long),
        ep_len=t(lengths, torch.long),
        state_mean=mean, state_std=std,
    )


def sample_batch(data: dict, batch_size: int, K: int, gen: torch.Generator) -> dict:
    """Segments of K steps: the trajectory is drawn with probability proportional to its length, the start
    uniformly inside it. A segment that runs past the episode's end is left-padded (as in DT) so the last
    position is always real, like at evaluation; `mask` marks the real positions, `next_mask` those that
    also have a next state."""
    ep = torch.multinomial(data["ep_len"].float(), batch_size, replacement=True, generator=gen)
    length = data["ep_len"][ep]
    start = (torch.rand(batch_size, generator=gen, device=length.device) * length).long()
    n_real = torch.clamp(length - start, max=K)
    offset = torch.arange(K, device=length.device) - (K - n_real)[:, None]  # (B, K), < 0 on padding
    mask = offset >= 0
    idx = data["ep_start"][ep, None] + start[:, None] + offset.clamp(min=0)
    next_mask = mask & data["has_next"][idx]
    zero_where = lambda x, keep: x * keep.view(*keep.shape, *([1] * (x.dim() - keep.dim())))
    pad = lambda x: zero_where(x[idx], mask)
    next_states = zero_where(data["states"][(idx + 1).clamp(max=len(data["states"]) - 1)], next_mask)
    return dict(states=pad(data["states"]), actions=pad(data["actions"]), rtg=pad(data["rtg"])[..., None],
                timesteps=data["timesteps"][idx] * mask, mask=mask,
                next_states=next_states, next_rtg=pad(data["next_rtg"])[..., None], next_mask=next_mask)


# ---------------------------------------------------------------------------------------------------
# Model: GPT over interleaved (g_t, s_t, a_t) tokens (Eq. 1.1) with three heads (Eq. 1.3, 1.5, 1.6).
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
    """Pre-LayerNorm transformer block (GPT-2 layout, ReLU as in Table 1.1 and the DT code)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x, allowed, return_attn=False):
        y, att = self.attn(self.ln1(x), allowed, return_attn)
        x = x + y
        return x + self.mlp(self.ln2(x)), att


class MultiObjectiveDecisionTransformer(nn.Module):
    def __init__(self, state_dim, act_dim, n_layer, n_head, n_embd, dropout, max_ep_len, gaussian_heads,
                 timestep_embedding=False):
        super().__init__()
        # One linear embedding per modality. No positional embedding (Table 1.1): as in the ODT code, nothing
        # tells the tokens their time but the causal order; --timestep-embedding adds DT's timestep embedding.
        self.embed_t = nn.Embedding(max_ep_len, n_embd) if timestep_embedding else None
        self.embed_g = nn.Linear(1, n_embd)
        self.embed_s = nn.Linear(state_dim, n_embd)
        self.embed_a = nn.Linear(act_dim, n_embd)
        self.embed_ln = nn.LayerNorm(n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # The task-specific parameters theta_DT, theta_s, theta_g of Eq. 1.9 are these heads; everything
        # else is shared. A Gaussian head outputs a mean and a log-std per dimension (Eq. 1.3, 1.5, 1.6).
        # Fig. 1.4a ablates the Gaussian heads "for states and returns" only: the action head is always Gaussian.
        self.gaussian_task = {"action": True, "state": gaussian_heads, "return": gaussian_heads}
        dims = {"action": act_dim, "state": state_dim, "return": 1}
        self.heads = nn.ModuleDict({k: nn.Linear(n_embd, (2 if self.gaussian_task[k] else 1) * d) for k, d in dims.items()})

    def forward(self, rtg, states, actions, timesteps, mask=None, return_attn=False):
        """rtg (B, K, 1), states (B, K, m_s), actions (B, K, m_a), timesteps (B, K), mask (B, K) bool or None.
        Returns {task: (mean, log-std or None)} for the tasks action (a_t), state (s_{t+1}) and return
        (g_{t+1}), each (B, K, dim), and per-block attention weights (list of (B, nh, 3K, 3K)) when return_attn."""
        B, K, _ = states.shape
        t = 0.0 if self.embed_t is None else self.embed_t(timesteps)
        tokens = torch.stack([self.embed_g(rtg) + t, self.embed_s(states) + t, self.embed_a(actions) + t], dim=2)
        x = self.drop(self.embed_ln(tokens.reshape(B, 3 * K, -1)))  # (B, 3K, C): g_1, s_1, a_1, g_2, ...
        allowed = torch.ones(3 * K, 3 * K, dtype=torch.bool, device=x.device).tril()  # causal
        if mask is not None:  # padded keys are hidden; every token still sees itself so no row is empty
            allowed = (allowed & mask.repeat_interleave(3, dim=1)[:, None, None, :]) | torch.eye(3 * K, dtype=torch.bool, device=x.device)
        attns = []
        for block in self.blocks:
            x, att = block(x, allowed, return_attn)
            attns.append(att)
        h = self.ln_f(x).reshape(B, K, 3, -1)
        # a_t from the s_t token (it has seen g_t, s_t, not a_t); s_{t+1}, g_{t+1} from the a_t token (it has
        # seen everything up to a_t and nothing of step t+1): thesis-map.md, Eq. 1.16.
        read = {"action": h[:, :, 1], "state": h[:, :, 2], "return": h[:, :, 2]}
        preds = {}
        for task in TASKS:
            out = self.heads[task](read[task])
            mean, log_std = out.chunk(2, dim=-1) if self.gaussian_task[task] else (out, None)
            if task == "action":
                mean = torch.tanh(mean)  # actions lie in [-1, 1]; states and returns are unbounded
            if log_std is not None:
                log_std = -5.0 + 3.5 * (torch.tanh(log_std) + 1)  # squashed into [-5, 2], the bounds ODT uses, for every head
            preds[task] = (mean, log_std)
        return preds, attns


def head_loss(mean, log_std, target, mask):
    """Gaussian NLL (Eq. 1.4, 1.7, 1.8: -log N summed over dimensions), or with log_std None the MSE averaged
    over dimensions (DT's l2, the Fig. 1.4a ablation); averaged over the positions where mask is True."""
    if log_std is None:
        per_step = ((mean - target) ** 2).mean(-1)
    else:
        per_step = (0.5 * ((target - mean) / log_std.exp()) ** 2 + log_std + 0.5 * math.log(2 * math.pi)).sum(-1)
    mask = mask.float()
    return (per_step * mask).sum() / mask.sum().clamp_min(1.0)  # a batch may hold no next state at all


def task_losses(preds: dict, batch: dict) -> dict:
    """L_DT, L_s, L_g (Eq. 1.4, 1.7, 1.8) on one batch, in float32 even under autocast."""
    targets = {"action": (batch["actions"], batch["mask"]), "state": (batch["next_states"], batch["next_mask"]),
               "return": (batch["next_rtg"], batch["mask"])}
    out = {}
    for task in TASKS:
        mean, log_std = preds[task]
        out[task] = head_loss(mean.float(), None if log_std is None else log_std.float(), *targets[task])
    return out


def loss_weights(lambdas, n_tasks: int = len(TASKS)) -> tuple[float, ...]:
    """lambda on the simplex Delta^2 (Eq. 1.10), checked so that a typo cannot silently reweight the tasks."""
    lam = tuple(float(x) for x in lambdas)
    if len(lam) != n_tasks:
        raise SystemExit(f"error: --lambdas needs {n_tasks} weights, one per task {TASKS} (got {len(lam)}: {lam}).")
    if not all(math.isfinite(x) and x >= 0 for x in lam):
        raise SystemExit(f"error: --lambdas must be non-negative (got {lam}); they lie on the simplex (Eq. 1.10).")
    if abs(sum(lam) - 1.0) > 1e-6:
        raise SystemExit(f"error: --lambdas must sum to 1 (got {lam}, sum {sum(lam):.8g}); e.g. --lambdas 0.5 0.25 0.25.")
    return lam


def shared_parameters(model) -> list:
    """Everything except the task-specific heads: the parameters all three tasks pull on (Ch. 3's theta)."""
    return [p for name, p in model.named_parameters() if not name.startswith("heads.")]


def task_gradient_cosines(model, losses: dict) -> dict:
    """Cosine similarity between the gradients of each pair of task losses on the shared parameters, and
    each gradient's norm (Ch. 3, §3.6-3.7). The losses are unweighted: the cosine ignores lambda anyway."""
    params = shared_parameters(model)
    grads = {}
    for task, loss in losses.items():
        g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)  # K = 1 never uses embed_a for a_t
        grads[task] = torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(g, params)])
    out = {f"grad_norm_{t}": grads[t].norm().item() for t in TASKS}
    for i, a in enumerate(TASKS):
        for b in TASKS[i + 1:]:
            out[f"cos_{a}_{b}"] = F.cosine_similarity(grads[a], grads[b], dim=0).item()
    return out


# ---------------------------------------------------------------------------------------------------
# Evaluation (§1.4.3, Alg. 1 lines 14-26): all episodes at once in a vector env, batched forwards.
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
    rtg = torch.zeros(n, horizon, 1, device=device)
    timesteps = torch.arange(horizon, device=device).clamp(max=args.max_ep_len - 1).expand(n, -1)
    rtg[:, 0] = args.target_return / args.rtg_scale  # g_1 (Alg. 1 "Require: target return g_1")
    returns, lengths = np.zeros(n), np.zeros(n, dtype=int)
    done = np.zeros(n, dtype=bool)
    attn = AttentionRecorder(len(model.blocks), model.blocks[0].attn.n_head, K) if record_attention else None
    model.eval()
    obs, _ = envs.reset(seed=seed)
    t0 = time.time()
    for t in range(horizon):
        states[:, t] = (torch.as_tensor(obs, device=device, dtype=torch.float32) - mean_t) / std_t
        lo = max(0, t - K + 1)  # Alg. 1 line 25: the last K steps; at the start the sequence is simply shorter
        window = lambda: (rtg[:, lo:t + 1], states[:, lo:t + 1], actions[:, lo:t + 1], timesteps[:, lo:t + 1])
        record = attn is not None and t + 1 >= K
        preds, atts = model(*window(), return_attn=record)
        a = torch.maximum(torch.minimum(preds["action"][0][:, -1].float(), high), low)  # Eq. 1.15, 1.17: the mean
        if record:
            attn.add(atts, ~torch.as_tensor(done, device=device))
        actions[:, t] = a
        obs, r, term, trunc, _ = envs.step(a.cpu().numpy())  # Alg. 1 line 22
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        if done.all() or t + 1 == horizon:
            break
        if args.rtg_update == "model":  # Eq. 1.16 / Alg. 1 line 23: g_{t+1} from the return head on the a_t token
            rtg[:, t + 1] = model(*window())[0]["return"][0][:, -1].float()
        else:  # DT's rule, for comparison
            rtg[:, t + 1] = rtg[:, t] - torch.as_tensor(r, device=device, dtype=torch.float32)[:, None] / args.rtg_scale
    envs.close()
    model.train()
    score = common.normalized_score(info, returns)
    return dict(returns=returns.tolist(), lengths=lengths.tolist(), normalized=score.tolist(),
                return_mean=float(returns.mean()), normalized_mean=float(score.mean()), normalized_std=float(score.std()),
                env_steps_per_s=float(lengths.sum() / (time.time() - t0)), attention=attn)


class AttentionRecorder:
    """Running sums of attention from state tokens (the rows that predict actions) during evaluation:
    per block the map over the whole context (Fig. 1.2 top), per block and head the mass on each
    modality (Fig. 1.2 bottom), and per head the entropy of the attention rows."""

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
# Training (Alg. 1 lines 2-13)
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


def optimizer_step(model, opt, loss, grad_clip) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return grad_norm


def update(model, opt, losses_on, batch, lambdas: dict, schedule: str, grad_clip: float) -> tuple[dict, torch.Tensor]:
    """One update on one batch. `joint`: one step on sum_i lambda_i L_i (Eq. 1.9, Alg. 1 line 12). `alternating`:
    one step on lambda_i L_i per task in turn, each task's gradient taken where the previous task's step left
    the weights (Ch. 3 Eq. 3.2-3.3, Thm 3). Returns the task losses (for alternating, each at the weights its
    own step started from) and the pre-clip gradient norm (for alternating, the mean over the task steps)."""
    if schedule == "joint":
        losses = losses_on(batch)
        return losses, optimizer_step(model, opt, sum(lambdas[k] * losses[k] for k in TASKS), grad_clip)
    losses, norms = {}, []
    for task in TASKS:
        if lambdas[task] == 0:
            continue  # a zero-weight step would still move the weights through momentum and decay
        losses[task] = losses_on(batch)[task]
        norms.append(optimizer_step(model, opt, lambdas[task] * losses[task], grad_clip))
    return losses, torch.stack(norms).mean()


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
    if args.updates == 0 and args.checkpoint is None:
        raise SystemExit("error: --updates 0 trains nothing; pass --checkpoint runs/RUN/model.pt to evaluate a trained model.")
    loss_weights(args.lambdas)
    if args.n_embd % args.n_head:
        raise SystemExit(f"error: --n-embd {args.n_embd} must be divisible by --n-head {args.n_head}.")


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


def claims_table(args: Args, trained_with: dict, trained: int, info: dict, res: dict, attention: Optional[dict],
                 cosines: list[dict]) -> list[dict]:
    """thesis claim | our measurement | verdict, for what one run can test. Score: within one of the thesis's
    standard deviations across its 10 seeds is reproduced, within two partly; a model trained with other
    settings than Table 1.1 is "not comparable". `trained_with`: the arguments the evaluated model was
    trained with (a checkpoint's, or this run's); `trained`: its updates in all."""
    rows = []
    # The inference settings are this run's; a checkpoint from before --timestep-embedding existed had one.
    config = dict(trained_with, updates=trained, rtg_update=args.rtg_update, target_return=args.target_return,
                  timestep_embedding=trained_with.get("timestep_embedding", True))
    short = f" (model trained {trained} updates, thesis 10^5)" if trained != TABLE_1_1["updates"] else ""
    label = SOURCE_LABEL[info["source"]]
    thesis = THESIS_TABLE_1_3.get(info["name"])
    if thesis is not None:
        mean, std = thesis
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
        rows.append(dict(claim=f"Table 1.3 MO-DT {info['name']}: {mean} ± {std} (official D4RL, 10 seeds, 10^5 updates)",
                         ours=f"{res['normalized_mean']:.2f} ± {res['normalized_std']:.2f} over {args.eval_episodes} episodes, "
                              f"seed {config['seed']}, {trained} updates, {label} data, rtg-update {args.rtg_update}",
                         verdict=verdict))
    if attention is not None:  # §1.5.2: "later blocks ... predominantly engage with ... action tokens over return or state tokens"
        rows.append(dict(claim="Fig. 1.2, §1.5.2: later blocks attend predominantly to action tokens over state and return tokens",
                         ours=attention_mass_text(attention), verdict=later_blocks_verdict(attention, ("action",)) + short))
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
    lambdas = dict(zip(TASKS, loss_weights(args.lambdas)))

    ckpt = None
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file (expected runs/RUN/model.pt).")
        try:
            ckpt = torch.load(args.checkpoint, map_location=device, weights_only=False)
        except Exception as e:
            raise SystemExit(f"error: --checkpoint {args.checkpoint}: torch cannot read it ({type(e).__name__}).") from None
        arch = ("gaussian_heads", "context_len", "n_layer", "n_head", "n_embd", "max_ep_len", "rtg_scale")
        # trdt.py's checkpoints carry every one of these keys too, plus --bins
        if not isinstance(ckpt, dict) or "model" not in ckpt or any(k not in ckpt.get("args", {}) for k in arch) or "bins" in ckpt["args"]:
            raise SystemExit(f"error: --checkpoint {args.checkpoint} is not a model.pt written by mo_dt.py.")
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


    data = make_dataset(episodes, device, args.rtg_scale, args.max_ep_len,
                        state_stats=None if ckpt is None else (ckpt["state_mean"], ckpt["state_std"]))
    model = MultiObjectiveDecisionTransformer(info["obs_dim"], info["act_dim"], args.n_layer, args.n_head, args.n_embd,
                                              args.dropout, args.max_ep_len, args.gaussian_heads,
                                              args.timestep_embedding).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    opt, sched = make_optimizer(model, args)
    fwd = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"run {run_name}: {info['transitions']} transitions in {info['episodes']} episodes ({info['source']}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}")
    print(f"state/return heads {'Gaussian NLL' if args.gaussian_heads else 'MSE'}, lambdas {lambdas}, schedule {args.schedule}, "
          f"rtg-update {args.rtg_update}, target return {args.target_return}. Interpretation choices:")
    for c in CHOICES:
        print(f"  - {c}")

    def run_eval(step, record_attention=False):
        res = evaluate(model, info, data["state_mean"], data["state_std"], args, device, seed=args.seed + 10_000, record_attention=record_attention)
        log(step=step, eval_return=res["return_mean"], eval_normalized=res["normalized_mean"], eval_normalized_std=res["normalized_std"])
        return res

    def losses_on(batch):
        with autocast:
            preds, _ = fwd(batch["rtg"], batch["states"], batch["actions"], batch["timesteps"], batch["mask"])
        return task_losses(preds, batch)

    if args.eval_every and args.updates:
        print(f"update 0: normalized score {run_eval(0)['normalized_mean']:.1f}")
    cosines = []
    t_train, step, aside = time.time(), 0, 0.0  # aside: seconds of evaluation and gradient analysis, not training
    bar = tqdm(range(args.updates), desc="train", dynamic_ncols=True, mininterval=1.0, disable=args.updates == 0)
    for step in bar:
        b = sample_batch(data, args.batch_size, args.context_len, gen)
        if args.grad_cos_every and (step % args.grad_cos_every == 0 or step == args.updates - 1):
            t0 = time.time()
            cosines.append(dict(step=step, **task_gradient_cosines(model, losses_on(b))))  # before this update's step
            log(**cosines[-1])
            aside += time.time() - t0
        losses, grad_norm = update(model, opt, losses_on, b, lambdas, args.schedule, args.grad_clip)
        sched.step()  # warmup counts updates, so both schedules follow the same learning-rate curve
        if step % args.log_every == 0 or step == args.updates - 1:  # .item() syncs the GPU: not every step
            loss = sum(lambdas[k] * v for k, v in losses.items())
            log(step=step, loss=loss.item(), **{f"loss_{k}": v.item() for k, v in losses.items()},
                grad_norm=grad_norm.item(), lr=sched.get_last_lr()[0])
            bar.set_postfix(loss=f"{loss.item():.4f}")
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
    attention = attn.report(run_dir, f"MO-DT on {info['name']}: attention from state tokens") if attn is not None else None
    trained_with = ckpt["args"] if ckpt is not None and not args.updates else asdict(args)
    claims = claims_table(args, trained_with, trained_updates, info, res, attention, cosines)
    results = dict(config, returns=res["returns"], lengths=res["lengths"], normalized=res["normalized"],
                   return_mean=res["return_mean"], normalized_mean=res["normalized_mean"], normalized_std=res["normalized_std"],
                   updates=args.updates, trained_updates=trained_updates, train_updates_per_s=updates_per_s, eval_env_steps_per_s=res["env_steps_per_s"],
                   wall_time_s=time.time() - t_start, run_dir=str(run_dir), claims=claims)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    metrics.close()

    print(f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over {args.eval_episodes} episodes "
          f"(return {res['return_mean']:.0f}; {SOURCE_LABEL[info['source']]} data, {trained_updates} updates, rtg-update {args.rtg_update})")
    if info["name"] in THESIS_TABLE_1_3:
        print(f"thesis Table 1.3 (MO-DT, official D4RL, 10^5 updates): {THESIS_TABLE_1_3[info['name']][0]}")
    if claims:
        print("\nthesis claim | our measurement | verdict")
        for row in claims:
            print(f"{row['claim']} | {row['ours']} | {row['verdict']}")
    print(f"results: {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
