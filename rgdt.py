"""Return-Guided Decision Translator (thesis Ch. 2, Eq. 2.3-2.8, Alg. 2): offline RL as translation from
a sequence of future returns to a sequence of past states, with actions from an inverse dynamics model.

    python rgdt.py --env hopper-medium                           # §2.4 settings, final-token loss
    python rgdt.py --env hopper-medium --full-context-loss       # Fig. 2.3 ablation (indicator = 1)
    python rgdt.py --env walker2d-medium --analyze               # + Fig. 2.2-style correlation and attention
    python rgdt.py --env hopper-medium --checkpoint runs/RUN/model.pt --updates 0 --inv-updates 0 --attention

Defaults are §2.4's. Flags shared with dt.py keep dt.py's names and meaning; dt.py's --context-len becomes
two context lengths (--return-len K_r, --state-len K_s) and --max-ep-len does not apply (no timestep
embedding). Two models train one after the other in one run, each with its own progress bar and losses
(`phase` in metrics.jsonl): the inverse dynamics (Eq. 2.8), then the translator (Eq. 2.7).

One file: arguments, data, model, loss, inverse dynamics, inference, analysis, training, in the order the
thesis introduces them. Shared with the other method files is only common.py (dataset loading, env ids,
normalized scores).
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

import common


@dataclass
class Args:
    """RGDT's flags; defaults are §2.4's (the module docstring, shown by --help, says more)."""

    env: str = "hopper-medium"
    """dataset: a D4RL gym-mujoco name such as `hopper-medium` (with or without `-v2`), or a Minari
    id such as `mujoco/hopper/medium-v0`"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official file;
    several are concatenated (medium + expert = medium-expert). Without it the official file is read from
    $D4RL_DATASET_DIR (default ~/.d4rl/datasets), downloaded there first if missing"""
    exp_name: str = "rgdt"
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch samplers and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    return_len: int = 20
    """K_r, the number of future returns-to-go g_{t+1..t+K_r} the encoder reads (Eq. 2.5); replaces
    dt.py's --context-len"""
    state_len: int = 5
    """K_s, the number of past states s_{t-K_s+1..t} the decoder reads (Eq. 2.4); replaces dt.py's
    --context-len"""
    n_enc_layer: int = 2
    """encoder (return-side) transformer layers (§2.4)"""
    n_layer: int = 3
    """decoder (state-side) transformer layers (§2.4); dt.py's name for the blocks that make the prediction"""
    n_head: int = 2
    """attention heads per layer, encoder and decoder"""
    n_embd: int = 64
    """hidden size of encoder and decoder"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches of the transformer"""
    full_context_loss: bool = False
    """train on the next state at every decoder position (indicator of Eq. 2.7 = 1, the Fig. 2.3 ablation);
    default: the final position only (indicator = 0), the thesis's choice"""
    batch_size: int = 256
    """segments per update of the sequence-to-sequence model"""
    lr: float = 5e-4
    """AdamW peak learning rate of the sequence-to-sequence model"""
    weight_decay: float = 1e-3
    """AdamW weight decay of the sequence-to-sequence model, applied to weight matrices only"""
    warmup_steps: int = 10_000
    """linear learning-rate warmup of the sequence-to-sequence model, in updates"""
    updates: int = 150_000
    """gradient updates of the sequence-to-sequence model; 0 with --checkpoint: keep the checkpoint's"""
    grad_clip: float = 0.25
    """clip the global gradient norm of the sequence-to-sequence model (§2.4 gives none; DT's value)"""
    inv_hidden: int = 512
    """width of each hidden layer of the inverse dynamics MLP (Eq. 2.8)"""
    inv_layers: int = 2
    """hidden layers of the inverse dynamics MLP"""
    inv_dropout: float = 0.1
    """dropout after each hidden layer of the inverse dynamics MLP"""
    inv_batch_size: int = 1024
    """transitions per update of the inverse dynamics model"""
    inv_lr: float = 1e-4
    """Adam learning rate of the inverse dynamics model"""
    inv_weight_decay: float = 1e-4
    """Adam (L2) weight decay of the inverse dynamics model, applied to weight matrices only"""
    inv_updates: int = 200_000
    """gradient updates of the inverse dynamics model; 0 with --checkpoint: keep the checkpoint's"""
    rtg_scale: float = 1000.0
    """returns-to-go are divided by this before they enter the model"""
    target_return: Optional[float] = None
    """default (None): condition on the best return-to-go per timestep in the dataset (§2.3.3); a number
    rescales that whole sequence so that it starts at this return"""
    eval_episodes: int = 10
    """episodes per evaluation, all run at once in a vector env"""
    eval_every: int = 10_000
    """evaluate before training and every N sequence-to-sequence updates (0: only at the end)"""
    eval_async: bool = False
    """step the evaluation envs in subprocesses (gymnasium AsyncVectorEnv); pays off with many CPU cores"""
    compile: bool = False
    """torch.compile the sequence-to-sequence model for training (CUDA)"""
    bf16: bool = True
    """bfloat16 autocast on CUDA (ignored on CPU)"""
    checkpoint: Optional[str] = None
    """a `model.pt` from an earlier run: start from its two models, architecture and state normalisation
    (the architecture flags are ignored); with --updates 0 --inv-updates 0 only evaluate them"""
    attention: bool = False
    """record decoder self- and cross-attention during the final evaluation (attention.png / .json)"""
    analyze: bool = False
    """write Fig. 2.2-style outputs (fig2_2.png / .json): state correlation vs timestep offset in the
    dataset, and decoder attention after final-token vs full-context training"""
    analyze_updates: int = 1000
    """updates of each of the two small translators --analyze trains (same init, same batches)"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_every: int = 100
    """log the training losses every N updates"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""


# Table 2.1 (official D4RL v2, 10 seeds), RGDT column, quoted from the thesis text. Its printed total is
# 539.0, but these six numbers add up to 540.0 (every other column of the table adds up): one of them, or
# the total, is off by 1.0 in the thesis; we print the rows as given.
THESIS_TABLE_2_1 = {"halfcheetah-medium": 44.4, "hopper-medium": 93.2, "walker2d-medium": 83.3,
                    "halfcheetah-medium-expert": 93.4, "hopper-medium-expert": 112.4, "walker2d-medium-expert": 113.3}
THESIS_TABLE_2_1_TOTAL = 539.0
SOURCE_LABEL = {"d4rl": "official D4RL", "minari": "Minari", "replica": "replica", "file": "local file"}


# ---------------------------------------------------------------------------------------------------
# Data (§2.2.1): trajectories as flat tensors on the training device; a batch is an index gather.
# ---------------------------------------------------------------------------------------------------


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """g_t = sum_{t' >= t} r_t' (undiscounted, §2.2.1)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


def make_dataset(episodes: list[dict], device: torch.device, rtg_scale: float, stats: Optional[tuple] = None) -> dict:
    """`stats`: the (mean, std) state normalization to use (a checkpoint's, so that further training and
    evaluation see states as the checkpoint's models did); default: this dataset's."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    mean, std = stats if stats is not None else (obs.mean(0), obs.std(0) + 1e-6)
    lengths = np.array([len(ep["rewards"]) for ep in episodes])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ends = starts + lengths
    # Every step t with a successor s_{t+1} in its episode is a training example of both models.
    has_next = np.concatenate([np.arange(n) < n - 1 for n in lengths])
    t = lambda x, dtype=torch.float32: torch.as_tensor(x, dtype=dtype, device=device)
    return dict(
        states=t((obs - mean) / std),
        actions=t(np.concatenate([ep["actions"] for ep in episodes])),
        rtg=t(np.concatenate([returns_to_go(ep["rewards"]) for ep in episodes]) / rtg_scale),
        ep_start=t(np.repeat(starts, lengths), torch.long),  # per step: first index of its episode
        ep_end=t(np.repeat(ends, lengths), torch.long),  # per step: one past the last index
        valid=t(np.flatnonzero(has_next), torch.long),
        state_mean=mean, state_std=std,
    )


def gather_segments(data: dict, t: torch.Tensor, K_r: int, K_s: int) -> dict:
    """The example of Eq. 2.3 ending at each global step index t: the K_s past states s_{t-K_s+1..t}
    (left-padded at the episode start, `mask` marks real ones), their successors s_{t-K_s+2..t+1} as
    targets, and the K_r future returns g_{t+1..t+K_r}. Past the episode's end no more reward comes, so
    those returns are 0 (also true at evaluation, where the conditioning sequence is padded with 0).
    Eq. 2.3 writes S_{t-K_s}^t and g_{t+1}^{t+K_r+1}, K_s + 1 and K_r + 1 items, while Eq. 2.4-2.5 and §2.4
    call them "K_s states" and "K_r returns": we take K_s and K_r items, so --state-len 5 --return-len 20
    are §2.4's numbers."""
    s_idx = t[:, None] + torch.arange(-K_s + 1, 1, device=t.device)  # (B, K_s)
    mask = s_idx >= data["ep_start"][t, None]
    s_idx = torch.where(mask, s_idx, t[:, None])
    m = mask[..., None].float()
    g_idx = t[:, None] + torch.arange(1, K_r + 1, device=t.device)  # (B, K_r)
    inside = g_idx < data["ep_end"][t, None]
    returns = torch.where(inside, data["rtg"][g_idx.clamp(max=len(data["rtg"]) - 1)], 0.0)
    return dict(states=data["states"][s_idx] * m, next_states=data["states"][s_idx + 1] * m,
                returns=returns[..., None], mask=mask)


def sample_steps(data: dict, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Global step indices t, uniform over all steps that have a successor (as DT: trajectory with
    probability proportional to its length, step uniform in it). Both models' batches come from here."""
    return data["valid"][torch.randint(len(data["valid"]), (batch_size,), generator=gen, device=data["valid"].device)]


def sample_batch(data: dict, batch_size: int, K_r: int, K_s: int, gen: torch.Generator) -> dict:
    """Translator segments (Eq. 2.3) ending at uniformly drawn steps."""
    return gather_segments(data, sample_steps(data, batch_size, gen), K_r, K_s)


# ---------------------------------------------------------------------------------------------------
# Model (§2.3.1, Fig. 2.1): an encoder over returns, a decoder over states with causal self-attention and
# cross-attention to the encoder. Each modality has its own weights, the point of the design.
# ---------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention of queries from `x` over keys/values from `context` (self-attention when
    context is x, cross-attention when it is the encoder's output)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.q = nn.Linear(n_embd, n_embd)
        self.kv = nn.Linear(n_embd, 2 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x, context, allowed=None, return_attn=False):
        B, T, C = x.shape
        split = lambda z: z.view(B, z.shape[1], self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, (k, v) = split(self.q(x)), map(split, self.kv(context).split(C, dim=2))
        if return_attn:  # explicit softmax, only for analysis: the weights themselves are the output
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
            if allowed is not None:
                att = att.masked_fill(~allowed, float("-inf"))
            att = att.softmax(-1)
            y = att @ v
        else:
            att = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y)), att


class Block(nn.Module):
    """A transformer layer [6]: self-attention, (decoder only) cross-attention to the encoder, feed-forward.
    Pre-LayerNorm as in GPT-2 / DT rather than the original post-LayerNorm (§2.4 does not say; pre-LN
    trains stably at these learning rates)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, cross: bool):
        super().__init__()
        self.ln1, self.ln3 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.self_attn = Attention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd) if cross else None
        self.cross_attn = Attention(n_embd, n_head, dropout) if cross else None
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x, allowed=None, memory=None, return_attn=False):
        h = self.ln1(x)
        y, self_att = self.self_attn(h, h, allowed, return_attn)
        x = x + y
        cross_att = None
        if self.cross_attn is not None:  # every state position may see every encoded return: no mask
            y, cross_att = self.cross_attn(self.ln2(x), memory, None, return_attn)
            x = x + y
        return x + self.mlp(self.ln3(x)), dict(self=self_att, cross=cross_att)


class DecisionTranslator(nn.Module):
    """rho_theta(s_{t+1} | S_{-K_s}, g_{+K_r}) of Eq. 2.6: a diagonal Gaussian over the next state."""

    def __init__(self, state_dim, n_enc_layer, n_layer, n_head, n_embd, dropout, return_len, state_len):
        super().__init__()
        if n_embd % n_head:  # train() says this to CLI users before it makes a run folder
            raise ValueError(f"n_embd {n_embd} must be divisible by n_head {n_head}")
        self.state_dim, self.state_len = state_dim, state_len
        # Learned positions within each sequence, as the vanilla transformer has positional encodings [6];
        # no absolute timestep embedding (the thesis names none, and the conditioning returns already
        # follow the episode's clock).
        self.embed_g, self.pos_g = nn.Linear(1, n_embd), nn.Parameter(torch.zeros(return_len, n_embd))
        self.embed_s, self.pos_s = nn.Linear(state_dim, n_embd), nn.Parameter(torch.zeros(state_len, n_embd))
        nn.init.normal_(self.pos_g, std=0.02), nn.init.normal_(self.pos_s, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(Block(n_embd, n_head, dropout, cross=False) for _ in range(n_enc_layer))
        self.decoder = nn.ModuleList(Block(n_embd, n_head, dropout, cross=True) for _ in range(n_layer))
        self.ln_enc, self.ln_dec = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, 2 * state_dim)  # Eq. 2.6: mean and log-std of s_{t+1}

    def forward(self, returns, states, mask=None, return_attn=False):
        """returns (B, K_r, 1), states (B, T <= K_s, m_s), mask (B, T) bool or None. Returns the mean and
        log-std of the next state at every decoder position (B, T, m_s) and, when return_attn, per decoder
        layer a dict of self- (B, nh, T, T) and cross-attention (B, nh, T, K_r) weights."""
        T = states.shape[1]
        memory = self.drop(self.embed_g(returns) + self.pos_g)
        for block in self.encoder:  # the encoder sees all K_r returns: no mask
            memory, _ = block(memory)
        memory = self.ln_enc(memory)
        # Positions count back from the newest state, so a short context at the start of an episode gets
        # the same embeddings as a left-padded one in training.
        x = self.drop(self.embed_s(states) + self.pos_s[self.state_len - T:])
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # s_i never sees s_{>i}
        if mask is not None:  # padded keys are hidden; every position still sees itself so no row is empty
            allowed = (allowed & mask[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=x.device)
        attns = []
        for block in self.decoder:
            x, att = block(x, allowed, memory, return_attn)
            attns.append(att)
        mean, log_std = self.head(self.ln_dec(x)).split(self.state_dim, dim=-1)
        return mean, bounded_log_std(log_std), attns


def bounded_log_std(x):
    """Squash a raw network output into a log-std in [-5, 2] (dt.py's bounds), for both Gaussians."""
    return -5.0 + 3.5 * (torch.tanh(x) + 1)


def gaussian_nll(mean, log_std, target):
    """-log N(target; mean, diag(exp(log_std)^2)), summed over dimensions (Eq. 2.7, Eq. 2.8)."""
    return (0.5 * ((target - mean) / log_std.exp()) ** 2 + log_std + 0.5 * math.log(2 * math.pi)).sum(-1)


def state_loss(mean, log_std, next_states, mask, full_context: bool):
    """Eq. 2.7. Indicator 0 (default): only the final position, s_{t+1} from the whole context. Indicator 1:
    every real position i predicts s_{i+1} from S_{..i} (and all returns). We average over the positions
    used instead of summing them, which only rescales the loss."""
    nll = gaussian_nll(mean, log_std, next_states)  # (B, T)
    if not full_context:
        return nll[:, -1].mean()  # the final position is always real (segments are left-padded)
    mask = mask.float()
    return (nll * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------------
# Policy extraction (§2.3.3): inverse dynamics pi_phi(a_t | s_t, s_{t+1}), Eq. 2.8.
# ---------------------------------------------------------------------------------------------------


def make_inverse_dynamics(state_dim, act_dim, hidden, layers, dropout) -> nn.Sequential:
    """An MLP from (s_t, s_{t+1}) to the mean and log-std of a diagonal Gaussian over a_t."""
    mods, width = [], 2 * state_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, 2 * act_dim))


def inverse_dynamics(inv, s, s_next):
    """Mean mu_phi (tanh: actions live in [-1, 1]) and log-std of pi_phi(a | s, s_next), Eq. 2.8."""
    mean, log_std = inv(torch.cat([s, s_next], -1)).chunk(2, dim=-1)
    return torch.tanh(mean), bounded_log_std(log_std)


def inverse_dynamics_loss(inv, data: dict, batch_size: int, gen: torch.Generator):
    """Maximum likelihood of the dataset's a_t given (s_t, s_{t+1}) (§2.3.3), on uniformly drawn steps."""
    t = sample_steps(data, batch_size, gen)
    mean, log_std = inverse_dynamics(inv, data["states"][t], data["states"][t + 1])
    return gaussian_nll(mean, log_std, data["actions"][t]).mean()


# ---------------------------------------------------------------------------------------------------
# Inference (Alg. 2): condition on the best return per timestep, propose s_{t+1}, invert it to an action.
# All episodes at once in a vector env, one batched forward of each model per environment step.
# ---------------------------------------------------------------------------------------------------


def env_horizon(info: dict) -> int:
    """The evaluation env's TimeLimit (1000 for MuJoCo): how many steps an episode may take."""
    env = common.make_env(info)
    horizon = env.spec.max_episode_steps or 1000
    env.close()
    return horizon


def best_return_sequence(episodes: list[dict], length: int) -> np.ndarray:
    """§2.3.3: at each timestep the best return-to-go any dataset trajectory has at that timestep;
    past the longest trajectory no return is observed and we pad with 0 (no reward is left, as for
    the returns past an episode's end in training). Unscaled, length `length`."""
    best = np.zeros(max(length, max(len(ep["rewards"]) for ep in episodes)))
    seen = np.zeros(len(best), dtype=bool)
    for ep in episodes:
        g = returns_to_go(ep["rewards"])
        n = len(g)
        best[:n] = np.where(seen[:n], np.maximum(best[:n], g), g)
        seen[:n] = True
    return best[:length]


@torch.no_grad()
def evaluate(model, inv, info, data, conditioning, args, device, seed, recorder=None) -> dict:
    import gymnasium as gym

    n, K_s, K_r = args.eval_episodes, args.state_len, args.return_len
    vec = gym.vector.AsyncVectorEnv if args.eval_async else gym.vector.SyncVectorEnv
    envs = vec([lambda: common.make_env(info)] * n)
    horizon = env_horizon(info)
    low, high = (torch.as_tensor(b[0], device=device) for b in (envs.action_space.low, envs.action_space.high))
    mean_t, std_t = (torch.as_tensor(x, device=device) for x in (data["state_mean"], data["state_std"]))
    g = torch.as_tensor(conditioning, device=device, dtype=torch.float32)  # (>= horizon + K_r,), scaled
    states = torch.zeros(n, horizon, info["obs_dim"], device=device)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=int)
    done = np.zeros(n, dtype=bool)
    model.eval(), inv.eval()
    obs, _ = envs.reset(seed=seed)
    t0 = time.time()
    for t in range(horizon):  # t is 0-based here; the thesis's timestep t + 1
        states[:, t] = (torch.as_tensor(obs, device=device, dtype=torch.float32) - mean_t) / std_t
        lo = max(0, t - K_s + 1)  # the last K_s states; at the start the sequence is simply shorter
        record = recorder is not None and t + 1 >= K_s
        cond = g[t + 1:t + 1 + K_r].view(1, K_r, 1).expand(n, -1, -1)  # g_{t+1..t+K_r}, the same for all envs
        mean, _, atts = model(cond, states[:, lo:t + 1], return_attn=record)  # Alg. 2 line 6
        a, _ = inverse_dynamics(inv, states[:, t], mean[:, -1])  # line 7: a_t from (s_t, s^_{t+1})
        a = torch.maximum(torch.minimum(a.float(), high), low)
        if record:
            recorder.add(atts, ~torch.as_tensor(done, device=device))
        obs, r, term, trunc, _ = envs.step(a.cpu().numpy())  # lines 8-9
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        if done.all():
            break
    envs.close()
    model.train(), inv.train()
    score = common.normalized_score(info, returns)
    return dict(returns=returns.tolist(), lengths=lengths.tolist(), normalized=score.tolist(),
                return_mean=float(returns.mean()), normalized_mean=float(score.mean()), normalized_std=float(score.std()),
                env_steps_per_s=float(lengths.sum() / (time.time() - t0)))


# ---------------------------------------------------------------------------------------------------
# Analysis (Fig. 2.2): how correlated successive states are, and where the decoder attends.
# ---------------------------------------------------------------------------------------------------


def state_correlation(states: np.ndarray, ep_start: np.ndarray, ep_end: np.ndarray, max_offset: int) -> np.ndarray:
    """Fig. 2.2a: Pearson correlation between each state dimension at t and at t + k, over all pairs inside
    one episode, for k = 0..max_offset. Returns (max_offset + 1, m_s); NaN for a constant dimension."""
    out = np.full((max_offset + 1, states.shape[1]), np.nan)
    idx = np.arange(len(states))
    for k in range(max_offset + 1):
        t = idx[idx + k < ep_end]
        if len(t) < 2:
            break
        x, y = states[t], states[t + k]
        x, y = x - x.mean(0), y - y.mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = (x * y).mean(0) / (x.std(0) * y.std(0))
    return out


class AttentionRecorder:
    """Running means, per decoder layer over heads and samples, of the state-to-state self-attention map
    (K_s x K_s) and of the state-to-return cross-attention map (K_s x K_r)."""

    def __init__(self, n_layer, K_s, K_r):
        self.self_maps, self.cross_maps, self.count = torch.zeros(n_layer, K_s, K_s), torch.zeros(n_layer, K_s, K_r), 0

    def add(self, atts, alive):
        for i, att in enumerate(atts):
            self.self_maps[i] += att["self"][alive].float().mean(1).sum(0).cpu()
            self.cross_maps[i] += att["cross"][alive].float().mean(1).sum(0).cpu()
        self.count += int(alive.sum())

    def summary(self) -> dict:
        c = max(self.count, 1)
        self_maps, cross_maps = self.self_maps / c, self.cross_maps / c
        last = self_maps.mean(0)[-1]  # the final state's row: the one that proposes s_{t+1} at inference
        return dict(samples=self.count, self_maps=self_maps.tolist(), cross_maps=cross_maps.tolist(),
                    final_row=last.tolist(),  # index K_s - 1 is the newest state, 0 the oldest
                    final_row_newest_two=float(last[-2:].sum()),
                    final_row_entropy=float(-(last * last.clamp_min(1e-12).log()).sum()),
                    uniform_entropy=math.log(len(last)))


def train_two_regimes(data, args, device, log) -> dict:
    """Fig. 2.2b-c: two translators from the same initial weights, trained on the same batches for
    --analyze-updates steps, one with the final-token loss and one with the full-context loss; then the
    decoder attention of each on the same dataset segments (full contexts only). The warmup is shortened
    to a tenth of that budget, else the short runs would never reach the learning rate.
    Fig. 2.2b's caption says "GPT model", but §2.3.2 uses the figure to argue for the indicator of Eq. 2.7
    in RGDT's own loss, so both regimes here are the RGDT translator and only the indicator differs."""
    short = Args(**{**asdict(args), "warmup_steps": max(1, args.analyze_updates // 10)})
    torch.manual_seed(args.seed + 1)
    init = make_translator(data, args).state_dict()
    probe = torch.Generator(device=device).manual_seed(args.seed + 2)
    full = data["valid"][(data["valid"] - data["ep_start"][data["valid"]]) >= args.state_len - 1]
    full = full if len(full) else data["valid"]  # every episode shorter than K_s: padded contexts it is
    probe_t = full[torch.randint(len(full), (min(512, len(full)),), generator=probe, device=device)]
    out = {}
    for name, full_context in (("final_token", False), ("full_context", True)):
        model = make_translator(data, args)
        model.load_state_dict(init)
        gen = torch.Generator(device=device).manual_seed(args.seed + 3)
        loss_fn = lambda: state_loss(*translator_forward(model, sample_batch(data, args.batch_size, args.return_len, args.state_len, gen), full_context))
        fit(model, loss_fn, *make_optimizer(model, short), args.analyze_updates, args.grad_clip, f"analyze_{name}", log, args)
        rec = AttentionRecorder(args.n_layer, args.state_len, args.return_len)
        b = gather_segments(data, probe_t, args.return_len, args.state_len)
        model.eval()
        with torch.no_grad():
            rec.add(model(b["returns"], b["states"], b["mask"], return_attn=True)[2], torch.ones(len(probe_t), dtype=torch.bool, device=device))
        out[name] = rec.summary()
    return out


def plot_attention(ax, summary: dict, title: str, which: str = "self_maps"):
    m = np.mean(summary[which], axis=0)
    im = ax.imshow(m, cmap="viridis", vmin=0, aspect="auto")
    K_s = m.shape[0]
    ax.set_yticks(range(K_s), [f"s(t-{K_s - 1 - i})" if i < K_s - 1 else "s(t)" for i in range(K_s)], fontsize=7)
    if which == "self_maps":
        ax.set_xticks(range(K_s), [f"t-{K_s - 1 - i}" if i < K_s - 1 else "t" for i in range(K_s)], fontsize=7)
        ax.set_xlabel("attended state (key)")
    else:
        ax.set_xlabel("return g(t+k), k = 1..K_r")
    ax.set_ylabel("attending state (query)")
    ax.set_title(title, fontsize=9)
    return im


def pyplot():
    """matplotlib, imported only when a figure is written, drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_fig_2_2(run_dir: Path, corr: np.ndarray, regimes: dict, title: str) -> dict:
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    k = np.arange(len(corr))
    ax[0].plot(k, corr, color="0.8", lw=0.8)
    ax[0].plot(k, np.nanmean(corr, 1), color="k", lw=2, label="mean over state dims")
    ax[0].set_xlabel("timestep offset k")
    ax[0].set_ylabel("Pearson corr(s_t, s_{t+k})")
    ax[0].set_title("(a) correlation in the dataset", fontsize=9)
    ax[0].legend(fontsize=8)
    for a, name, label in ((ax[1], "full_context", "(b) full-context training"), (ax[2], "final_token", "(c) final-token training")):
        fig.colorbar(plot_attention(a, regimes[name], f"{label}: decoder self-attention"), ax=a)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_dir / "fig2_2.png", dpi=110)
    plt.close(fig)
    out = dict(correlation_per_dim=np.where(np.isnan(corr), None, corr).tolist(), correlation_mean=np.nanmean(corr, 1).tolist(),
               attention=regimes)
    (run_dir / "fig2_2.json").write_text(json.dumps(out))
    return out


def write_attention(run_dir: Path, summary: dict, title: str) -> None:
    """--attention: the trained model's decoder maps during the final evaluation."""
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    fig.colorbar(plot_attention(ax[0], summary, "decoder self-attention (states)"), ax=ax[0])
    fig.colorbar(plot_attention(ax[1], summary, "decoder cross-attention (returns)", "cross_maps"), ax=ax[1])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_dir / "attention.png", dpi=110)
    plt.close(fig)
    (run_dir / "attention.json").write_text(json.dumps(summary))


def fig_2_2_claims(fig: dict, K_s: int) -> list[dict]:
    """The two statements of Fig. 2.2's caption, each with our measurement and a verdict."""
    c = np.array(fig["correlation_mean"][:K_s + 1])
    steps = np.diff(c)
    corr_verdict = "reproduced" if np.all(steps < 0) else ("partly" if c[-1] < c[1] else "not reproduced")
    ft, fc = fig["attention"]["final_token"], fig["attention"]["full_context"]
    nearer = fc["final_row_newest_two"] > ft["final_row_newest_two"]
    peakier = fc["final_row_entropy"] < ft["final_row_entropy"]
    att_verdict = "reproduced" if nearer and peakier else ("partly" if nearer or peakier else "not reproduced")
    return [
        dict(claim="Fig. 2.2a: state correlation decreases with timestep offset",
             ours="mean corr at k=0..%d: %s" % (K_s, ", ".join(f"{x:.3f}" for x in c)), verdict=corr_verdict),
        dict(claim="Fig. 2.2b-c: full-context training biases attention toward nearby states; final-token is more balanced",
             ours=(f"final state's attention on newest 2 states: full-context {fc['final_row_newest_two']:.3f} vs final-token "
                   f"{ft['final_row_newest_two']:.3f}; entropy {fc['final_row_entropy']:.3f} vs {ft['final_row_entropy']:.3f} "
                   f"(uniform {ft['uniform_entropy']:.3f})"),
             verdict=att_verdict),
    ]


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def git_commit() -> Optional[str]:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None


def make_translator(data: dict, args: Args) -> DecisionTranslator:
    return DecisionTranslator(data["states"].shape[1], args.n_enc_layer, args.n_layer, args.n_head, args.n_embd,
                              args.dropout, args.return_len, args.state_len).to(data["states"].device)


def translator_forward(model, b: dict, full_context: bool):
    """The arguments of state_loss for a batch: the model's prediction at every position, and targets."""
    mean, log_std, _ = model(b["returns"], b["states"], b["mask"])
    return mean.float(), log_std.float(), b["next_states"], b["mask"], full_context


def decay_matrices_only(model, weight_decay: float) -> list[dict]:
    """Parameter groups with weight decay on weight matrices only (not biases, LayerNorms, positions), as in
    nanoGPT and dt.py; used by both optimizers."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p.dim() >= 2 and not n.startswith("pos_") for n, p in named]  # pos_g, pos_s are (K, C) but positions
    return [dict(params=[p for (_, p), d in zip(named, decay) if d], weight_decay=weight_decay),
            dict(params=[p for (_, p), d in zip(named, decay) if not d], weight_decay=0.0)]


def make_optimizer(model, args):
    """The translator's AdamW with linear warmup (§2.4)."""
    opt = torch.optim.AdamW(decay_matrices_only(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps)))
    return opt, sched


def fit(model, loss_fn: Callable, opt, sched, updates: int, grad_clip: Optional[float], phase: str, log: Callable, args,
        after_step: Optional[Callable] = None) -> Optional[float]:
    """The update loop both models share: its own progress bar, the loss logged every --log-every updates
    with a `phase` field, `after_step(step, bar)` after each update (evaluation). Returns updates/s of the
    updates alone: time spent in after_step is not counted."""
    t0, outside = time.time(), 0.0
    bar = tqdm(range(updates), desc=phase, dynamic_ncols=True, mininterval=1.0, disable=updates == 0)
    for step in bar:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
        opt.step()
        if sched is not None:
            sched.step()
        if step % args.log_every == 0 or step == updates - 1:  # .item() syncs the GPU: not every step
            log(phase=phase, step=step, loss=loss.item(), grad_norm=grad_norm.item(), lr=opt.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if after_step is not None:
            t_after = time.time()
            after_step(step + 1, bar)
            outside += time.time() - t_after
    return updates / (time.time() - t0 - outside) if updates else None


def check_args(args: Args) -> None:
    positive = dict(return_len=args.return_len, state_len=args.state_len, n_enc_layer=args.n_enc_layer, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, batch_size=args.batch_size, inv_batch_size=args.inv_batch_size,
                    inv_hidden=args.inv_hidden, inv_layers=args.inv_layers, eval_episodes=args.eval_episodes,
                    rtg_scale=args.rtg_scale, lr=args.lr, inv_lr=args.inv_lr, log_every=args.log_every,
                    analyze_updates=args.analyze_updates)
    for name, v in positive.items():
        if v <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0 (got {v}).")
    if min(args.updates, args.inv_updates, args.eval_every, args.warmup_steps, args.threads) < 0:
        raise SystemExit("error: --updates, --inv-updates, --eval-every, --warmup-steps, --threads must be >= 0.")
    if not (0 <= args.dropout < 1 and 0 <= args.inv_dropout < 1):
        raise SystemExit("error: --dropout and --inv-dropout must be in [0, 1).")
    if args.checkpoint is None and (args.updates == 0 or args.inv_updates == 0):
        raise SystemExit("error: --updates 0 or --inv-updates 0 leaves a model untrained; pass --checkpoint runs/RUN/model.pt "
                         "to evaluate trained models.")
    if args.target_return is not None and args.target_return <= 0:
        raise SystemExit(f"error: --target-return must be > 0 (got {args.target_return}); leave it out to use the best "
                         "return per timestep (§2.3.3).")


# §2.4's configuration: only a model trained (and evaluated) with these is judged against Table 2.1.
SECTION_2_4 = dict(n_enc_layer=2, n_layer=3, n_head=2, n_embd=64, return_len=20, state_len=5, lr=5e-4, warmup_steps=10_000,
                   weight_decay=1e-3, dropout=0.1, updates=150_000, batch_size=256, inv_hidden=512, inv_layers=2,
                   inv_lr=1e-4, inv_weight_decay=1e-4, inv_dropout=0.1, inv_updates=200_000, inv_batch_size=1024,
                   full_context_loss=False, target_return=None)


def score_claim(info: dict, res: dict, args: Args, trained_with: dict, trained: tuple[int, int]) -> dict:
    """Table 2.1 beside our score, judged with mo_dt.py's rule: within one standard deviation reproduced, two
    partly. Table 2.1 prints no spread, so the deviation is ours, across the evaluation episodes. Judged only
    for a model trained with §2.4's configuration (`trained_with`, a checkpoint's arguments or this run's;
    `trained`: its translator and inverse dynamics updates in all) and conditioned as §2.3.3 says."""
    thesis = THESIS_TABLE_2_1.get(info["name"])
    label = SOURCE_LABEL[info["source"]]
    ours = (f"{res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} ({args.eval_episodes} episodes, {label} data, "
            f"{trained[0]} + {trained[1]} updates)")
    claim = f"Table 2.1 RGDT {info['name']}: {thesis}" if thesis is not None else f"Table 2.1 has no {info['name']} row"
    config = dict(trained_with, updates=trained[0], inv_updates=trained[1], target_return=args.target_return)
    differs = [k for k, v in SECTION_2_4.items() if config.get(k) != v]
    if thesis is None:
        verdict = "no thesis number"
    elif differs:
        verdict = f"not comparable: differs from §2.4 in {', '.join(differs)}"
    else:
        gap, std = abs(res["normalized_mean"] - thesis), res["normalized_std"]
        verdict = "reproduced" if gap <= std else ("partly" if gap <= 2 * std else "not reproduced")
    if thesis is not None and info["source"] != "d4rl":
        verdict += f" ({label} data, not the thesis's files)"
    return dict(claim=claim, ours=ours, verdict=verdict)


def print_claims(claims: list[dict]) -> None:
    w = [max(len(h), *(len(c[k]) for c in claims)) for h, k in (("thesis claim", "claim"), ("ours", "ours"), ("verdict", "verdict"))]
    row = lambda a, b, c: f"| {a:<{w[0]}} | {b:<{w[1]}} | {c:<{w[2]}} |"
    print(row("thesis claim", "ours", "verdict"))
    print(row("-" * w[0], "-" * w[1], "-" * w[2]))
    for c in claims:
        print(row(c["claim"], c["ours"], c["verdict"]))


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
        raise SystemExit(f"error: --device {args.device}: not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}, but torch sees no CUDA GPU; use --device cpu (or auto).")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Everything that can fail on bad input fails here, before a run folder is made.
    ckpt = None
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file (expected runs/RUN/model.pt).")
        try:
            ckpt = torch.load(args.checkpoint, map_location=device, weights_only=False)
        except Exception as e:
            raise SystemExit(f"error: --checkpoint {args.checkpoint}: torch cannot read it ({type(e).__name__}); pass a model.pt "
                             "that rgdt.py wrote.") from None
        if not isinstance(ckpt, dict) or "inverse_dynamics" not in ckpt:
            raise SystemExit(f"error: --checkpoint {args.checkpoint} is not an rgdt.py model.pt (it has no inverse dynamics model).")
        for k in ("return_len", "state_len", "n_enc_layer", "n_layer", "n_head", "n_embd", "inv_hidden", "inv_layers", "rtg_scale"):
            setattr(args, k, ckpt["args"][k])  # the architecture is the checkpoint's, whatever the flags say
    if args.n_embd % args.n_head:
        raise SystemExit(f"error: --n-embd {args.n_embd} must be divisible by --n-head {args.n_head}.")
    try:
        episodes, info = common.load_dataset(args.env, args.dataset_path)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    if ckpt is not None and (ckpt["dataset"]["obs_dim"], ckpt["dataset"]["act_dim"]) != (info["obs_dim"], info["act_dim"]):
        raise SystemExit(f"error: --checkpoint was trained on {ckpt['dataset']['name']} (obs {ckpt['dataset']['obs_dim']}, act "
                         f"{ckpt['dataset']['act_dim']}), not on data shaped like {info['name']} (obs {info['obs_dim']}, act "
                         f"{info['act_dim']}); pass the --env it was trained on.")
    horizon = env_horizon(info)
    best = best_return_sequence(episodes, horizon + args.return_len)  # g_{t+1..t+K_r} for t < horizon
    if args.target_return is not None:  # our knob, not the thesis's: the same shape, another starting return
        if best[0] <= 0:
            raise SystemExit("error: --target-return needs a dataset whose best return at t = 0 is > 0; leave it out.")
        best = best * args.target_return / best[0]
        print(f"--target-return {args.target_return}: the best-return sequence is rescaled to start there (our knob, not the thesis's)")
    conditioning = best / args.rtg_scale

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


    data = make_dataset(episodes, device, args.rtg_scale, None if ckpt is None else (ckpt["state_mean"], ckpt["state_std"]))
    model = make_translator(data, args)
    inv = make_inverse_dynamics(info["obs_dim"], info["act_dim"], args.inv_hidden, args.inv_layers, args.inv_dropout).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        inv.load_state_dict(ckpt["inverse_dynamics"])
    print(f"run {run_name}: {info['transitions']} transitions in {info['episodes']} episodes ({info['source']}), "
          f"translator {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M + inverse dynamics "
          f"{sum(p.numel() for p in inv.parameters()) / 1e6:.2f}M parameters, device {device}")
    print(f"choices (thesis ambiguous): K_r returns g(t+1..t+K_r) and K_s states s(t-K_s+1..t) (Eq. 2.3 writes K_r+1 and K_s+1); "
          f"returns past an episode end are 0; conditioning = best return per timestep, 0 past the longest trajectory "
          f"(starts at {best[0]:.0f}); {'full-context' if args.full_context_loss else 'final-token'} loss (Eq. 2.7 indicator "
          f"{int(args.full_context_loss)}); inverse dynamics trained first so evaluations during translator training are meaningful")

    eval_seed = args.seed + 10_000

    def run_eval(phase, step, recorder=None):
        res = evaluate(model, inv, info, data, conditioning, args, device, seed=eval_seed, recorder=recorder)
        log(phase=phase, step=step, eval_return=res["return_mean"], eval_normalized=res["normalized_mean"], eval_normalized_std=res["normalized_std"])
        return res

    evaluating = args.eval_every and args.updates
    if evaluating and args.inv_updates:
        print(f"before training: normalized score {run_eval('inverse', 0)['normalized_mean']:.1f}")
    # The inverse dynamics first (Eq. 2.8, its own Adam, no warmup or clipping in §2.4): the translator's
    # periodic evaluations need a trained one to turn proposed states into actions.
    inv_opt = torch.optim.Adam(decay_matrices_only(inv, args.inv_weight_decay), lr=args.inv_lr)
    gen_inv = torch.Generator(device=device).manual_seed(args.seed + 1)
    inv_updates_per_s = fit(inv, lambda: inverse_dynamics_loss(inv, data, args.inv_batch_size, gen_inv), inv_opt, None,
                            args.inv_updates, None, "inverse", log, args)

    opt, sched = make_optimizer(model, args)
    fwd = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def translator_loss():
        b = sample_batch(data, args.batch_size, args.return_len, args.state_len, gen)
        with autocast:
            return state_loss(*translator_forward(fwd, b, args.full_context_loss))

    def periodic_eval(step, bar):
        if args.eval_every and step % args.eval_every == 0 and step < args.updates:
            res = run_eval("translator", step)
            bar.write(f"translator update {step}: normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f}")

    if evaluating:
        print(f"translator update 0 (inverse dynamics trained): normalized score {run_eval('translator', 0)['normalized_mean']:.1f}")
    updates_per_s = fit(model, translator_loss, opt, sched, args.updates, args.grad_clip, "translator", log, args, periodic_eval)

    # Updates in all, a checkpoint's included (older checkpoints did not record theirs: their run's flags then)
    before = (0, 0) if ckpt is None else tuple(ckpt.get(k, ckpt["args"][a]) for k, a in (("trained_updates", "updates"),
                                                                                         ("trained_inv_updates", "inv_updates")))
    trained = (before[0] + args.updates, before[1] + args.inv_updates)
    if args.updates or args.inv_updates:
        torch.save(dict(model=model.state_dict(), inverse_dynamics=inv.state_dict(), args=asdict(args), state_mean=data["state_mean"],
                        state_std=data["state_std"], dataset=info, trained_updates=trained[0], trained_inv_updates=trained[1]),
                   run_dir / "model.pt")
    recorder = AttentionRecorder(args.n_layer, args.state_len, args.return_len) if args.attention else None
    res = run_eval("final", args.updates, recorder)
    if recorder is not None:
        write_attention(run_dir, recorder.summary(), f"RGDT on {info['name']}: decoder attention during evaluation")

    trained_with = ckpt["args"] if ckpt is not None and not (args.updates or args.inv_updates) else asdict(args)
    claims = [score_claim(info, res, args, trained_with, trained)]
    if args.analyze:
        ends = data["ep_end"].cpu().numpy()
        corr = state_correlation(data["states"].cpu().numpy(), data["ep_start"].cpu().numpy(), ends, max(args.return_len, args.state_len))
        fig = write_fig_2_2(run_dir, corr, train_two_regimes(data, args, device, log), f"Fig. 2.2-style analysis on {info['name']} ({SOURCE_LABEL[info['source']]} data)")
        claims += fig_2_2_claims(fig, args.state_len)

    results = dict(config, returns=res["returns"], lengths=res["lengths"], normalized=res["normalized"],
                   return_mean=res["return_mean"], normalized_mean=res["normalized_mean"], normalized_std=res["normalized_std"],
                   updates=args.updates, train_updates_per_s=updates_per_s, eval_env_steps_per_s=res["env_steps_per_s"],
                   wall_time_s=time.time() - t_start, run_dir=str(run_dir),
                   inv_updates=args.inv_updates, inv_train_updates_per_s=inv_updates_per_s, claims=claims)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    metrics.close()

    print(f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over {args.eval_episodes} episodes "
          f"(return {res['return_mean']:.0f}; {SOURCE_LABEL[info['source']]} data, {args.updates} translator + "
          f"{args.inv_updates} inverse dynamics updates)")
    print(f"thesis Table 2.1 (RGDT, official D4RL, 10 seeds, 150k + 200k updates): "
          + ", ".join(f"{k} {v}" for k, v in THESIS_TABLE_2_1.items())
          + f"; printed total {THESIS_TABLE_2_1_TOTAL}, though the rows add up to {sum(THESIS_TABLE_2_1.values()):.1f}")
    print_claims(claims)
    print(f"results: {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
