"""Decision Transformer (thesis §1.3.2, Eq. 1.1-1.4): offline RL as conditional sequence modelling.

    python dt.py --env hopper-medium-replay                      # the original DT (deterministic, l2)
    python dt.py --env hopper-medium-replay --policy gaussian    # Gaussian NLL (Eq. 1.3-1.4), ODT-O-style
    python dt.py --env hopper-medium-replay --checkpoint runs/RUN/model.pt --updates 0 --attention   # Fig. 1.1

One file: arguments, data, model, evaluation, training, in the order the thesis introduces them.
Shared with the other method files is only common.py (dataset loading, env ids, normalized scores).
"""

from __future__ import annotations

import json
import math
import os
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
    exp_name: str = "dt"
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    policy: Literal["deterministic", "gaussian"] = "deterministic"
    """`deterministic`: l2 regression, the original DT; `gaussian`: diagonal Gaussian NLL (Eq. 1.3-1.4),
    the offline ODT variant (ODT-O) of Table 1.3"""
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
    timestep_embedding: bool = True
    """a learned timestep embedding added to every token of a step (the DT paper's, in place of
    GPT-2's positions); `--no-timestep-embedding` drops it"""
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
    """clip the global gradient norm at this value"""
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
    """bfloat16 autocast on CUDA (ignored on CPU)"""
    checkpoint: Optional[str] = None
    """a `model.pt` from an earlier run: start from its weights, architecture and state normalisation
    (the architecture flags are ignored); add --updates 0 to only evaluate it"""
    attention: bool = False
    """record attention during the final evaluation and write Fig. 1.1-style plots and numbers"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_every: int = 100
    """log the training loss every N updates"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""


# Table 1.3 (official D4RL v2), for printing beside our score. The DT column holds the DT paper's values
# where the thesis's table was damaged in extraction (9.79, 9.99, 8.98 -> 67.6, 66.6, 86.8).
THESIS_TABLE_1_3 = {
    "deterministic": {"halfcheetah-medium": 42.6, "hopper-medium": 67.6, "walker2d-medium": 74.0,
                      "halfcheetah-medium-replay": 36.6, "hopper-medium-replay": 82.7, "walker2d-medium-replay": 66.6,
                      "halfcheetah-medium-expert": 86.8, "hopper-medium-expert": 107.6, "walker2d-medium-expert": 108.1},
    "gaussian": {"halfcheetah-medium": 42.72, "hopper-medium": 66.95, "walker2d-medium": 72.19,
                 "halfcheetah-medium-replay": 39.99, "hopper-medium-replay": 86.64, "walker2d-medium-replay": 68.92,
                 "halfcheetah-medium-expert": 88.76, "hopper-medium-expert": 107.24, "walker2d-medium-expert": 108.65},
}
TARGET_RETURNS = {"hopper": 3600.0, "walker2d": 5000.0, "halfcheetah": 6000.0}  # the DT paper's
MODALITIES = ("return", "state", "action")  # token order within a timestep (Eq. 1.1)


# ---------------------------------------------------------------------------------------------------
# Data: trajectories as one set of flat tensors on the training device; a batch is an index gather.
# ---------------------------------------------------------------------------------------------------


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """g_t = sum_{t' >= t} r_t', the undiscounted return-to-go of §1.3.1 (the g tokens of Eq. 1.1)."""
    return np.cumsum(rewards[::-1])[::-1].copy()


def make_dataset(episodes: list[dict], device: torch.device, rtg_scale: float, max_ep_len: int, state_stats=None) -> dict:
    """`state_stats` (mean, std): normalise with these instead of the dataset's own (a checkpoint's, so
    that training on from it and evaluating it see states on the scale the model learnt)."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    mean, std = state_stats if state_stats is not None else (obs.mean(0), obs.std(0) + 1e-6)
    lengths = np.array([len(ep["rewards"]) for ep in episodes])
    t = lambda x, dtype=torch.float32: torch.as_tensor(x, dtype=dtype, device=device)
    return dict(
        states=t((obs - mean) / std),
        actions=t(np.concatenate([ep["actions"] for ep in episodes])),
        rtg=t(np.concatenate([returns_to_go(ep["rewards"]) for ep in episodes]) / rtg_scale),
        timesteps=t(np.concatenate([np.minimum(np.arange(n), max_ep_len - 1) for n in lengths]), torch.long),
        ep_start=t(np.concatenate([[0], np.cumsum(lengths)[:-1]]), torch.long),
        ep_len=t(lengths, torch.long),
        state_mean=mean, state_std=std,
    )


def sample_batch(data: dict, batch_size: int, K: int, gen: torch.Generator) -> dict:
    """Segments of K steps: the trajectory is drawn with probability proportional to its length, the start
    uniformly inside it. A segment that runs past the episode's end is left-padded (as in DT) so the last
    position is always real, like at evaluation; `mask` marks the real positions."""
    ep = torch.multinomial(data["ep_len"].float(), batch_size, replacement=True, generator=gen)
    length = data["ep_len"][ep]
    start = (torch.rand(batch_size, generator=gen, device=length.device) * length).long()
    n_real = torch.clamp(length - start, max=K)
    offset = torch.arange(K, device=length.device) - (K - n_real)[:, None]  # (B, K), < 0 on padding
    mask = offset >= 0
    idx = data["ep_start"][ep, None] + start[:, None] + offset.clamp(min=0)
    pad = lambda x: x[idx] * mask.view(*mask.shape, *([1] * (x.dim() - 1)))
    return dict(states=pad(data["states"]), actions=pad(data["actions"]), rtg=pad(data["rtg"])[..., None],
                timesteps=data["timesteps"][idx] * mask, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Model: GPT over interleaved (g_t, s_t, a_t) tokens (Eq. 1.1); a_t is read off the s_t token.
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
    """Pre-LayerNorm transformer block (GPT-2 layout, ReLU as in the DT code)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = SelfAttention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x, allowed, return_attn=False):
        y, att = self.attn(self.ln1(x), allowed, return_attn)
        x = x + y
        return x + self.mlp(self.ln2(x)), att


class DecisionTransformer(nn.Module):
    def __init__(self, state_dim, act_dim, n_layer, n_head, n_embd, dropout, max_ep_len, policy, timestep_embedding=True):
        super().__init__()
        self.act_dim, self.policy = act_dim, policy
        # One linear embedding per modality plus (--timestep-embedding) a timestep embedding added to all
        # three tokens of a step; no positional embedding (the DT code removes GPT-2's).
        self.embed_t = nn.Embedding(max_ep_len, n_embd) if timestep_embedding else None
        self.embed_g = nn.Linear(1, n_embd)
        self.embed_s = nn.Linear(state_dim, n_embd)
        self.embed_a = nn.Linear(act_dim, n_embd)
        self.embed_ln = nn.LayerNorm(n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # Eq. 1.3: mean and (for the Gaussian policy) log-std of a diagonal Gaussian over a_t.
        self.head = nn.Linear(n_embd, act_dim * (2 if policy == "gaussian" else 1))

    def forward(self, rtg, states, actions, timesteps, mask=None, return_attn=False):
        """rtg (B, K, 1), states (B, K, m_s), actions (B, K, m_a), timesteps (B, K), mask (B, K) bool or None.
        Returns the action mean (B, K, m_a), log-std (B, K, m_a) or None, and per-block attention weights
        (list of (B, nh, 3K, 3K)) when return_attn."""
        B, K, _ = states.shape
        t = 0.0 if self.embed_t is None else self.embed_t(timesteps)
        tokens = torch.stack([self.embed_g(rtg) + t, self.embed_s(states) + t, self.embed_a(actions) + t], dim=2)
        x = self.drop(self.embed_ln(tokens.reshape(B, 3 * K, -1)))  # (B, 3K, C): g_1, s_1, a_1, g_2, ...
        allowed = torch.ones(3 * K, 3 * K, dtype=torch.bool, device=x.device).tril()  # causal: a_t ~ pi(. | Gamma_t), Eq. 1.2
        if mask is not None:  # padded keys are hidden; every token still sees itself so no row is empty
            allowed = (allowed & mask.repeat_interleave(3, dim=1)[:, None, None, :]) | torch.eye(3 * K, dtype=torch.bool, device=x.device)
        attns = []
        for block in self.blocks:
            x, att = block(x, allowed, return_attn)
            attns.append(att)
        h = self.ln_f(x).reshape(B, K, 3, -1)[:, :, 1]  # the s_t tokens: they have seen g_t, s_t, not a_t
        out = self.head(h)
        if self.policy == "deterministic":
            return torch.tanh(out), None, attns
        # Our choice where Eq. 1.3 is silent: the mean is tanh-squashed into the action box like DT's
        # deterministic head and the loss is the plain Gaussian NLL of Eq. 1.4, without ODT's tanh-transformed
        # distribution and entropy constraint. Evaluation acts with the mean.
        mean, log_std = out.split(self.act_dim, dim=-1)
        log_std = -5.0 + 3.5 * (torch.tanh(log_std) + 1)  # squashed into [-5, 2], the bounds ODT uses
        return torch.tanh(mean), log_std, attns


def action_loss(mean, log_std, target, mask):
    """DT's l2 loss, or the Gaussian NLL of Eq. 1.4, averaged over the real (unpadded) positions."""
    if log_std is None:
        per_step = ((mean - target) ** 2).mean(-1)
    else:
        per_step = (0.5 * ((target - mean) / log_std.exp()) ** 2 + log_std + 0.5 * math.log(2 * math.pi)).sum(-1)
    mask = mask.float()
    return (per_step * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------------
# Evaluation: all episodes at once in a vector env, one batched forward per environment step.
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, info, state_mean, state_std, args, device, seed, record_attention=False) -> dict:
    import gymnasium as gym

    n, K = args.eval_episodes, args.context_len
    vec = gym.vector.AsyncVectorEnv if args.eval_async else gym.vector.SyncVectorEnv
    envs = vec([lambda: common.make_env(info)] * n)
    horizon = common.make_env(info).spec.max_episode_steps or 1000  # the TimeLimit: 1000 for MuJoCo
    low, high = (torch.as_tensor(b[0], device=device) for b in (envs.action_space.low, envs.action_space.high))
    mean_t, std_t = torch.as_tensor(state_mean, device=device), torch.as_tensor(state_std, device=device)
    states = torch.zeros(n, horizon, info["obs_dim"], device=device)
    actions = torch.zeros(n, horizon, info["act_dim"], device=device)
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
        lo = max(0, t - K + 1)  # Gamma_t of Eq. 1.2: the last K steps; at the start the sequence is simply shorter
        record = attn is not None and t + 1 >= K
        a, _, atts = model(rtg[:, lo:t + 1], states[:, lo:t + 1], actions[:, lo:t + 1], timesteps[:, lo:t + 1], return_attn=record)
        a = torch.maximum(torch.minimum(a[:, -1].float(), high), low)
        if record:
            attn.add(atts, ~torch.as_tensor(done, device=device))
        actions[:, t] = a
        obs, r, term, trunc, _ = envs.step(a.cpu().numpy())
        returns += r * ~done
        lengths += ~done
        done |= term | trunc
        if done.all() or t + 1 == horizon:  # no slot for g_{t+1} past the horizon (an env without a TimeLimit)
            break
        rtg[:, t + 1] = rtg[:, t] - torch.as_tensor(r, device=device, dtype=torch.float32)[:, None] / args.rtg_scale  # DT's rule
    envs.close()
    model.train()
    score = common.normalized_score(info, returns)
    return dict(returns=returns.tolist(), lengths=lengths.tolist(), normalized=score.tolist(),
                return_mean=float(returns.mean()), normalized_mean=float(score.mean()), normalized_std=float(score.std()),
                env_steps_per_s=float(lengths.sum() / (time.time() - t0)), attention=attn)


class AttentionRecorder:
    """Running sums of attention from state tokens (the rows that predict actions) during evaluation:
    per block the map over the whole context (Fig. 1.1 top), per block and head the mass on each
    modality (Fig. 1.1 bottom), and per head the entropy of the attention rows."""

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

        if self.count == 0:
            print(f"warning: no evaluation step had a full context of {self.K} steps (episodes ended sooner); the attention plots are empty.")
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


def make_optimizer(model, args):
    """AdamW; weight decay on matrices only, as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, args.warmup_steps)))
    return opt, sched


def check_args(args: Args) -> None:
    positive = dict(context_len=args.context_len, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                    batch_size=args.batch_size, eval_episodes=args.eval_episodes, max_ep_len=args.max_ep_len,
                    rtg_scale=args.rtg_scale, lr=args.lr, log_every=args.log_every)
    for name, v in positive.items():
        if v <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be > 0 (got {v}).")
    if args.updates < 0 or args.eval_every < 0 or args.warmup_steps < 0 or not 0 <= args.dropout < 1:
        raise SystemExit("error: --updates, --eval-every, --warmup-steps must be >= 0 and --dropout in [0, 1).")
    if args.updates == 0 and args.checkpoint is None:
        raise SystemExit("error: --updates 0 trains nothing; pass --checkpoint runs/RUN/model.pt to evaluate a trained model.")
    if args.n_embd % args.n_head:
        raise SystemExit(f"error: --n-embd {args.n_embd} must be divisible by --n-head {args.n_head}.")


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
        arch = ("policy", "context_len", "n_layer", "n_head", "n_embd", "max_ep_len", "rtg_scale")
        if not isinstance(ckpt, dict) or "model" not in ckpt or any(k not in ckpt.get("args", {}) for k in arch):
            raise SystemExit(f"error: --checkpoint {args.checkpoint} is not a model.pt written by dt.py.")
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
    model = DecisionTransformer(info["obs_dim"], info["act_dim"], args.n_layer, args.n_head, args.n_embd,
                                args.dropout, args.max_ep_len, args.policy, args.timestep_embedding).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    opt, sched = make_optimizer(model, args)
    fwd = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    print(f"run {run_name}: {info['transitions']} transitions in {info['episodes']} episodes ({info['source']}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}")

    def run_eval(step, record_attention=False):
        res = evaluate(model, info, data["state_mean"], data["state_std"], args, device, seed=args.seed + 10_000, record_attention=record_attention)
        log(step=step, eval_return=res["return_mean"], eval_normalized=res["normalized_mean"], eval_normalized_std=res["normalized_std"])
        return res

    if args.eval_every and args.updates:
        print(f"update 0: normalized score {run_eval(0)['normalized_mean']:.1f}")
    t_train, aside = time.time(), 0.0  # aside: seconds of periodic evaluation, which updates/s must not count
    bar = tqdm(range(args.updates), desc="train", dynamic_ncols=True, mininterval=1.0, disable=args.updates == 0)
    for step in bar:
        b = sample_batch(data, args.batch_size, args.context_len, gen)
        with autocast:
            mean, log_std, _ = fwd(b["rtg"], b["states"], b["actions"], b["timesteps"], b["mask"])
            loss = action_loss(mean.float(), None if log_std is None else log_std.float(), b["actions"], b["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.updates - 1:  # .item() syncs the GPU: not every step
            log(step=step, loss=loss.item(), grad_norm=grad_norm.item(), lr=sched.get_last_lr()[0])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.updates:
            t0 = time.time()
            res = run_eval(step + 1)
            aside += time.time() - t0
            bar.write(f"update {step + 1}: normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f}")
    train_time = time.time() - t_train - aside
    updates_per_s = args.updates / train_time if args.updates else None

    if args.updates:
        torch.save(dict(model=model.state_dict(), args=asdict(args), state_mean=data["state_mean"], state_std=data["state_std"], dataset=info), run_dir / "model.pt")
    res = run_eval(args.updates, record_attention=args.attention)
    attn = res.pop("attention")
    if attn is not None:
        attn.report(run_dir, f"DT ({args.policy}) on {info['name']}: attention from state tokens")
    results = dict(config, returns=res["returns"], lengths=res["lengths"], normalized=res["normalized"],
                   return_mean=res["return_mean"], normalized_mean=res["normalized_mean"], normalized_std=res["normalized_std"],
                   updates=args.updates, train_updates_per_s=updates_per_s, eval_env_steps_per_s=res["env_steps_per_s"],
                   wall_time_s=time.time() - t_start, run_dir=str(run_dir))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    metrics.close()

    thesis = THESIS_TABLE_1_3[args.policy].get(info["name"])
    label = {"d4rl": "official D4RL", "minari": "Minari", "replica": "replica", "file": "local file"}[info["source"]]
    print(f"normalized score {res['normalized_mean']:.1f} ± {res['normalized_std']:.1f} over {args.eval_episodes} episodes "
          f"(return {res['return_mean']:.0f}; {label} data, {args.updates} updates)")
    if thesis is not None:
        print(f"thesis Table 1.3 ({'DT' if args.policy == 'deterministic' else 'ODT-O'}, official D4RL, 10^5 updates): {thesis}")
    print(f"results: {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
