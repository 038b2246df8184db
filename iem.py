"""Iterative energy minimization (LEAP; Chen et al., "Planning with Sequence Models through
Iterative Energy Minimization", ICLR 2023) on BabyAI: the blog's third system (§5.c), a BERT-like
bidirectional masked model over a whole plan of actions, used as an energy function and minimized
by iterative refinement: by default LEAP's code's rule (re-mask one action, take the argmax, keep
it); --temperature 1 is the paper's Gibbs sampling.

    python iem.py --env GoToLocalS7N5 --preset cpu  # bot demos collected on first use; minutes
    python iem.py --env GoToObjMazeS4               # the paper's settings (H=10, 29 refinements)
    python iem.py --checkpoint runs/RUN/model.pt --updates 0 --iterations 29   # only plan
    python iem.py --resume runs/RUN  # continue a run stopped by Ctrl-C, SIGTERM or SIGUSR1

What the defaults cost: minutes on a CPU (the first run also collects the bot's demos); the paper
levels with H=10 and 29 refinements plan at about 16 ms per env step with the energy trace, 3 ms
without.

One file, in reading order: flags, data (minigrid's BabyAI bot), model, loss and update, planning,
evaluation (IEM against the BC baseline: the same network, one forward, no refinement), training;
below them the run infrastructure. benchmarks/iem_analysis.py measures the blog's §7.b claims.
Blocks marked PLUMBING are the same, byte for byte, as in dt.py and the other method files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI levels with gymnasium)
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from minigrid.wrappers import FullyObsWrapper
from torch import nn
from tqdm import tqdm

import common  # the memory checks (check_needs, out_of_memory) and their measured constants

# The paper's BabyAI levels with its code's planning settings (test_run.sh): horizon H and
# refinements. Its `sample_iteration` counts the first fill of all positions as an iteration, so
# its 10 is our 9 (its 30, our 29). Its GoToObjMazeS4R2Close is minigrid's GoToObjMazeS4R2 (doors
# closed, the same arguments).
PAPER_LEVELS = {
    "GoToLocalS7N5": (5, 9),
    "GoToLocalS8N7": (5, 9),
    "PickupLoc": (5, 9),
    "GoToObjMazeS4R2": (5, 9),
    "GoToObjMazeS4": (10, 29),
    "GoToObjMazeS7": (10, 29),
}
# LEAP's fork of BabyAI (babyai/levels/iclr19_levels.py) builds GoToObjMazeS4 and S7 as minigrid's
# GoTo class with minigrid's arguments plus doors_open=True; minigrid registers them with the doors
# closed. We construct minigrid's class with the fork's arguments: the names are the paper's levels.
OPEN = {"doors_open": True}
LEAP_ENV_ARGS = {"BabyAI-GoToObjMazeS4-v0": OPEN, "BabyAI-GoToObjMazeS7-v0": OPEN}
# Budgets. paper: its code's width 128 and 200 epochs over 500 demos in batches of 64 (1600
# updates); cpu: narrower, more demos, minutes on 2 CPU cores.
PAPER_BUDGET = dict(n_embd=128, updates=1600, collect=500)
PRESETS = {"paper": PAPER_BUDGET, "cpu": dict(n_embd=64, updates=1000, collect=5000)}
N_ACTIONS = 7  # minigrid: left, right, forward, pickup, drop, toggle, done
MASK, PAD = N_ACTIONS, N_ACTIONS + 1  # plan-token ids after the actions
IGNORE = -100  # F.cross_entropy's ignore_index: positions that are not training targets
AGENT = 10  # minigrid's OBJECT_TO_IDX["agent"]
# The words of the BabyAI grammar (minigrid.envs.babyai.core.verifier); any other word is UNK.
WORDS = tuple(
    "a the go to pick up open put next and then after you your on left right in front of behind "
    "door ball box key red green blue purple yellow grey".split()
)
METHOD = "iem"
DEFAULT_ENV = "GoToLocalS7N5"  # the level without --env or --checkpoint
# The architecture's flags; a checkpoint records them with the data's grid size and mission length.
ARCH = "horizon n_layer n_head n_embd dropout".split()
# Evaluation episodes' seeds start here, never a demonstration's (demos use 0..N-1).
EVAL_SEED_BASE = 1_000_000_000
# Flags that say where and how a run runs, not what it computes: --resume takes them from its own
# command line.
RUN_FLAGS = "resume device threads runs_dir data_dir track wandb_project_name wandb_entity".split()


@dataclass
class Args:
    # --- architecture
    horizon: int | None = None
    """H, action tokens per plan; default: the paper's for --env (PAPER_LEVELS), else 5"""
    n_layer: int = 3
    """transformer blocks (the paper's 3)"""
    n_head: int = 4
    """attention heads per block (the paper's 4)"""
    n_embd: int | None = None
    """embedding width; default: the preset's (the paper's 128)"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches (the paper's 0.1)"""
    # --- loss
    train_all_masked: bool = True
    """also train each plan fully masked (where planning starts, and the BC baseline's input);
    the paper masks one action at a time only"""
    # --- optimizer and budget
    preset: Literal["paper", "cpu"] = "paper"
    """budget for the flags left unset: `paper` (n-embd 128, 1600 updates, 500 demos) or `cpu`
    (64, 1000, 5000)"""
    batch_size: int = 64
    """demonstration plans per update (the paper's 64); each is trained as its H (+1) masked
    copies"""
    lr: float = 6e-4
    """AdamW peak learning rate (the paper's); linear warmup over 5% of the updates, cosine decay
    to 10%"""
    updates: int | None = None
    """gradient updates; default: the preset's. With --checkpoint, 0 only evaluates it"""
    # --- data
    env: str | None = None
    """BabyAI level of minigrid, short (GoToLocalS7N5, GoToObjMazeS4, PickupLoc, ...) or full
    (BabyAI-...-v0). GoToObjMazeS4 and S7 are built with their doors open, as LEAP's fork builds
    them. Default: the checkpoint's level, else GoToLocalS7N5"""
    dataset: str | None = None
    """your demos instead of the bot's: an .npz of images (N, W, H, 3), actions (N,), lengths
    (E,), missions (E,)"""
    data_dir: str = "~/.cache/seqrl/babyai"
    """where bot demonstrations are cached as `{level}__bot{N}.npz` (a level built with its doors
    open: `{level}__doors_open=True__bot{N}.npz`); nothing is downloaded"""
    collect: int | None = None
    """bot demonstrations (episode seeds 0..N-1) collected on first use and cached; default: the
    preset's"""
    # --- inference: planning and evaluation
    iterations: int | None = None
    """refinement iterations after the first fill; default: the paper's for --env
    (PAPER_LEVELS), else 9"""
    resample: int = 1
    """plan tokens masked and resampled per iteration (the paper's code: 1)"""
    temperature: float = 0.0
    """of the resampled tokens: 0 takes the argmax (LEAP's code), 1 samples the model's
    conditionals (Gibbs sampling, the paper's text)"""
    accept: Literal["all", "lower"] = "all"
    """`all`: keep every resampled plan (LEAP's code; a plain Gibbs chain at --temperature 1);
    `lower`: keep it only if its energy does not rise (our rule, in neither source)"""
    replan_every: int | None = None
    """actions executed from each plan before replanning; default: H (the paper's code executes
    the whole plan)"""
    eval_episodes: int = 100
    """evaluation episodes, planned together in batches; the same episodes for IEM and BC"""
    # --- the run: where and how it runs, what it keeps
    exp_name: str = METHOD
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler, the planner and the evaluation episodes"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    compile: bool = False
    """torch.compile for training: on CUDA the whole update, replayed as CUDA graphs; on a CPU the
    model. Its first updates are timed apart (compile_time_s in results.json)"""
    bf16: bool = True
    """bfloat16 autocast for training where the hardware has it natively (CUDA; CPUs with
    AVX512-BF16 or AMX)"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1; all of them slow
    down sharply when another program keeps one busy)"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    track: bool = False
    """also log to Weights & Biases (needs `pip install -e ".[track]"`); metrics.jsonl stays the
    record"""
    wandb_project_name: str = "seqrl"
    """W&B project of --track"""
    wandb_entity: str | None = None
    """W&B team or user of --track (default: your W&B default entity)"""
    checkpoint: str | None = None
    """a `model.pt` of an earlier run: start from its weights and architecture (--n-layer,
    --n-head, --n-embd and --horizon are then the checkpoint's); with --updates 0 only evaluate
    it"""
    resume: str | None = None
    """a run folder (runs/RUN) that stopped before its end: continue it there, with its own flags,
    optimizer, schedule and random states, to its --updates; the result is the run it would have
    been without the stop"""
    save_every: int = 0
    """write the resumable checkpoint model.pt every N updates (0: every 10% of the run); also at
    the end and on Ctrl-C, SIGTERM or SIGUSR1"""
    log_every: int = 50
    """log the training loss every N updates"""

    def __post_init__(self):
        complete_and_check(self)  # the preset's and level's values for unset flags; one-line errors


# --- Data: minigrid's BabyAI bot on fully observed grids, cached as .npz; on the device as flat
# tensors.


def env_id(name: str) -> str:
    return name if name.startswith("BabyAI-") else f"BabyAI-{name}-v0"


def make_env(level: str):
    """Fully observed (the paper plans from the full image too): obs["image"] is (W, H, 3) of
    minigrid's (object, colour, state) codes, the agent and its direction in its cell. Built with
    LEAP's arguments (LEAP_ENV_ARGS)."""
    return FullyObsWrapper(gym.make(env_id(level), **env_args(level)))


def env_args(level: str) -> dict:
    return LEAP_ENV_ARGS.get(env_id(level), {})


def level_file_name(level: str) -> str:
    """The level in cache file names; a level built with LEAP's arguments gets its own name, so
    that demos of minigrid's registration of the same id are never read for it."""
    return env_id(level) + "".join(f"__{k}={v}" for k, v in env_args(level).items())


def reset(env, seed: int):
    with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints every rejected level layout
        return env.reset(seed=seed)[0]


def tokenize(mission: str, length: int) -> list[int]:
    """Mission words as ids (0 PAD, 1 UNK, then WORDS), cut or padded to `length`."""
    words = mission.replace(",", "").split()
    ids = [WORDS.index(w) + 2 if w in WORDS else 1 for w in words][:length]
    return ids + [0] * (length - len(ids))


def collect_demos(level: str, n: int, path: Path) -> None:
    """Episodes of minigrid's BabyAI bot (`BabyAIBot(env).replan()` once per step) on seeds
    0..n-1; failures are left out. Written to a temporary name first, so an interrupted collection
    leaves no cache behind."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    env, images, actions, lengths, missions = make_env(level), [], [], [], []
    for seed in tqdm(range(n), desc=f"bot demos {level}", dynamic_ncols=True, mininterval=1.0):
        obs, ep_images, ep_actions, r = reset(env, seed), [], [], 0.0
        bot = BabyAIBot(env)
        for _ in range(env.unwrapped.max_steps):
            ep_images.append(obs["image"])
            ep_actions.append(int(bot.replan()))
            obs, r, term, trunc, _ = env.step(ep_actions[-1])
            if term or trunc:
                break
        if r > 0:
            images, actions = images + ep_images, actions + ep_actions
            lengths.append(len(ep_actions))
            missions.append(obs["mission"])
    failed = n - len(lengths)
    if failed:
        print(f"warning: the bot failed {failed} of {n} {level} episodes; they are left out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    images = np.stack(images).astype(np.uint8)
    arrays = {"images": images, "actions": np.array(actions), "lengths": np.array(lengths)}
    np.savez_compressed(tmp, missions=np.array(missions), **arrays)
    os.replace(tmp, path)


def load_demos(level: str, dataset: Optional[str], data_dir: str, collect: int) -> tuple[dict, str]:
    """The demos of `level`: the .npz `dataset`, else the bot's `collect` episodes cached in
    `data_dir` (collected on first use). Returns the arrays and the file they came from."""
    level = env_id(level)
    cache = Path(data_dir).expanduser() / f"{level_file_name(level)}__bot{collect}.npz"
    path = Path(dataset) if dataset else cache
    if dataset is None and not path.exists():
        collect_demos(level, collect, path)
    try:
        with np.load(path) as z:
            d = {k: z[k] for k in ("images", "actions", "lengths", "missions")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        why = f"{e.__class__.__name__}: {e}"
        what = "not an .npz of images, actions, lengths, missions"
        raise SystemExit(f"error: --dataset {path}: {what} ({why}).") from None
    n, grid = len(d["actions"]), make_env(level).observation_space["image"].shape
    episodes = d["lengths"].sum() == n and len(d["missions"]) == len(d["lengths"])
    if not (d["images"].shape == (n, *grid) and episodes):
        shapes = {k: v.shape for k, v in d.items()}
        what = f"arrays {shapes} are not episodes of {level} (grids {grid})"
        raise SystemExit(f"error: --dataset {path}: {what}.")
    return d, str(path)


def make_dataset(d: dict, mission_len: int, device: torch.device) -> dict:
    """Per step of every demo: its grid, action, mission words and where its episode ends."""
    ep = np.repeat(np.arange(len(d["lengths"])), d["lengths"])
    words = [tokenize(str(m), mission_len) for m in d["missions"]]
    words = np.array(words, np.int64).reshape(-1, mission_len)
    end = np.cumsum(d["lengths"])[ep]
    arrays = {"images": d["images"], "actions": d["actions"], "end": end, "words": words[ep]}
    return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}


def sample_batch(data: dict, batch_size: int, H: int, gen: torch.Generator):
    """Plans of H actions from uniformly drawn steps; past the episode's end a plan holds PAD
    tokens (inputs saying that the mission is done, never targets), as in the paper's code."""
    n = len(data["actions"])
    idx = torch.randint(n, (batch_size,), generator=gen, device=gen.device)
    steps = idx[:, None] + torch.arange(H, device=idx.device)
    valid = steps < data["end"][idx, None]
    plan = torch.where(valid, data["actions"][steps.clamp(max=n - 1)], PAD)
    return data["images"][idx].long(), data["words"][idx], plan, valid


# --- Model: a bidirectional encoder over [start observation, mission words, a_1..a_H]; logits per
# plan token.


def egocentric(images: torch.Tensor) -> torch.Tensor:
    """(B, W, H, 3) fully observed grids -> (B, S, S, 3), S = 2 max(W, H) - 1, re-centred on the
    agent and turned so that it faces up (row 0 = farthest ahead); cells off the grid are 0
    ('unseen'). Our choice: the paper feeds the absolute image plus the agent's and the goal's
    positions (the goal from the bot, privileged); invariance to translation and rotation lets a
    small model learn from few demos, without the goal."""
    B, W, H, _ = images.shape
    R, b = max(W, H) - 1, torch.arange(B, device=images.device)
    where = (images[..., 0] == AGENT).flatten(1).float().argmax(1)
    ax, ay = where // H, where % H
    # minigrid's DIR_TO_VEC, (1, 0), (0, 1), (-1, 0), (0, -1), computed rather than looked up in a
    # table that every forward would copy to the device
    d = images[b, ax, ay, 2]
    dx, dy = (d == 0).long() - (d == 2).long(), (d == 1).long() - (d == 3).long()
    dx, dy, ax, ay = dx[:, None, None], dy[:, None, None], ax[:, None, None], ay[:, None, None]
    off = torch.arange(-R, R + 1, device=images.device)
    # row r is R - r cells ahead, column c is c - R right
    ahead, right = -off[None, :, None], off[None, None, :]
    # minigrid's right_vec is (-dy, dx)
    x, y = ax + ahead * dx - right * dy, ay + ahead * dy + right * dx
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    return images[b[:, None, None], x.clamp(0, W - 1), y.clamp(0, H - 1)] * inside[..., None]


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block with GELU, as the minGPT block of the paper's code, without its causal
    mask."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.drop = nn.Dropout(dropout)
        self.attn = nn.MultiheadAttention(n_embd, n_head, dropout=dropout, batch_first=True)
        mlp = (nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.mlp = nn.Sequential(*mlp, nn.Dropout(dropout))

    def forward(self, x, hidden_keys):
        h = self.ln1(x)
        # no weights: the fused kernel; benchmarks/iem_analysis.py asks for them with a hook
        y = self.attn(h, h, h, key_padding_mask=hidden_keys, need_weights=False)[0]
        x = x + self.drop(y)
        return x + self.mlp(self.ln2(x))


class MaskedPlanModel(nn.Module):
    """The masked model over plans (BERT-like, blog §5.c): each plan position's logits over the 7
    actions given the start observation, the mission and the rest of the plan. The paper's energy
    and its planner are built from it (energy, plan)."""

    def __init__(self, grid, mission_len, horizon, n_layer, n_head, n_embd, dropout):
        super().__init__()
        self.horizon, self.mission_len = horizon, mission_len
        S = 2 * max(grid) - 1
        # minigrid's object, colour, state codes
        self.cells = nn.ModuleList(nn.Embedding(n, 16) for n in (11, 6, 4))
        convs = (nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        convs += (nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())
        flat = 32 * ((S + 1) // 2) ** 2
        self.conv = nn.Sequential(*convs, nn.Flatten(), nn.Linear(flat, n_embd))
        self.word = nn.Embedding(len(WORDS) + 2, n_embd)
        self.act = nn.Embedding(N_ACTIONS + 2, n_embd)  # the actions, MASK, PAD
        slots = 1 + mission_len + horizon  # one position embedding per sequence slot
        self.pos = nn.Parameter(0.02 * torch.randn(1, slots, n_embd))
        self.drop = nn.Dropout(dropout)
        blocks = (EncoderBlock(n_embd, n_head, dropout) for _ in range(n_layer))
        self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(n_embd)
        # never predicts MASK or PAD, like the paper's action head
        self.head = nn.Linear(n_embd, N_ACTIONS)

    def forward(self, images, words, plan, copies=1):
        """images (B, W, H, 3), words (B, M), plan (B * copies, H) tokens, each context serving
        `copies` consecutive plans (the masked copies of one plan). The sequence is [obs, words,
        plan], T = 1 + M + H tokens. Returns logits (B * copies, H, N_ACTIONS)."""
        ego = egocentric(images)
        cells = sum(e(ego[..., i]) for i, e in enumerate(self.cells))
        obs = self.conv(cells.permute(0, 3, 1, 2))
        ctx = torch.cat([obs[:, None], self.word(words)], 1).repeat_interleave(copies, 0)
        x = self.drop(torch.cat([ctx, self.act(plan)], 1) + self.pos)
        # Bidirectional (blog §5.c): no causal mask; every token sees every real token, earlier
        # and later plan steps alike. Only padded mission words are hidden.
        hidden = F.pad(words == 0, (1, plan.shape[1])).repeat_interleave(copies, 0)
        for block in self.blocks:
            x = block(x, hidden)
        return self.head(self.ln_f(x[:, -plan.shape[1] :]))


# --- Loss and update: the masked language model's, on masked copies of demonstration plans.


def single_masks(plan: torch.Tensor, all_masked: bool = False):
    """Masked copies of each plan: copy j hides action j (one token at a time, the paper's masking,
    whose NLLs are the energy's terms), plus a fully masked copy if asked. Returns (copies (B*C,
    H), hidden (B*C, H), C)."""
    B, H = plan.shape
    hide = torch.eye(H, dtype=torch.bool, device=plan.device)
    hide = torch.cat([hide, torch.ones_like(hide[:1])]) if all_masked else hide
    copies = plan.repeat_interleave(len(hide), 0).masked_fill(hide.repeat(B, 1), MASK)
    return copies, hide.repeat(B, 1), len(hide)


def masked_loss(model, images, words, plan, valid, all_masked):
    """Cross-entropy of the hidden actions given the rest: the training loss of a masked language
    model, averaged over the hidden actions inside the episode. The other positions are labelled
    IGNORE rather than cut out with a boolean mask, whose size the host would wait for."""
    copies, hidden, C = single_masks(plan, all_masked)
    target = hidden & valid.repeat_interleave(C, 0)
    logits = model(images, words, copies, copies=C)
    labels = torch.where(target, plan.repeat_interleave(C, 0), IGNORE)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def make_optimizer(model, lr: float, updates: int):
    """The paper's code's optimizer: AdamW (0.9, 0.95), weight decay 0.1 on weight matrices only.
    The rate warms up linearly over 5% of the updates, then decays on a cosine to 10% at the last
    update. The paper's code (minGPT's rule) counts tokens instead: at its budget its warmup and
    decay end after about 16 and 47 updates, and its cosine, not clamped past the end, then swings
    back up; ours spans the run."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    # fused: one kernel a step (benchmarks/ops.py)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
    warmup = max(1, updates // 20)

    def lr_factor(step):
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, updates - warmup)))
        return min((step + 1) / warmup, max(0.1, cosine))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def update(model, opt, batch, all_masked: bool, autocast) -> tuple[dict, torch.Tensor]:
    """One gradient step of the masked model on a batch of plans, the gradient norm clipped at 1
    (the paper's code). Returns the loss and the norm before clipping, as tensors: reading them
    would wait for the device."""
    images, words, plan, valid = batch
    opt.zero_grad(set_to_none=True)
    with autocast:
        loss = masked_loss(model, images, words, plan, valid, all_masked)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return {"masked": loss.detach()}, grad_norm


# --- Planning: iterative energy minimization (the paper's §3, blog §5.c).


@dataclass(frozen=True)
class Planning:
    """How a plan is made (--iterations, --resample, --temperature, --accept) and how much of it
    is executed before the next (--replan-every; None: all H actions)."""

    iterations: int
    resample: int = 1
    temperature: float = 0.0
    accept: str = "all"
    replan_every: Optional[int] = None


@torch.no_grad()
def energy(model, images, words, plan) -> torch.Tensor:
    """E(tau) = sum_t -log p(a_t | s_0, mission, tau without a_t): the negative
    pseudo-log-likelihood of the masked model, the paper's trajectory energy; one batched forward
    over the H single-masked copies. Returns (B,)."""
    B, H = plan.shape
    copies, _, _ = single_masks(plan)
    # (plan, copy, position)
    logits = model(images, words, copies, copies=H).view(B, H, H, -1)
    own = logits.diagonal(dim1=1, dim2=2).transpose(1, 2)  # copy j's logits at the action it hides
    nll = -own.float().log_softmax(-1).gather(2, plan[..., None])
    return nll.view(B, H).sum(1)


@torch.no_grad()
def plan(model, images, words, H: int, planning: Planning, gen, refine=True, trace=True):
    """The all-masked plan filled in one forward (argmax: the first iteration of LEAP's code, and
    alone the BC baseline); then `planning.iterations` times mask `planning.resample` random
    positions, resample them from the model at `planning.temperature` (0: argmax), and keep the
    candidate always (`--accept all`, LEAP's code) or only if its energy did not rise (`lower`).
    Returns the plans (B, H) and, with `trace`, the energy after every iteration (B, iterations +
    1), else None. The energy costs H forwards per iteration, which `--accept all` needs only for
    the trace."""
    B = len(images)
    all_masked = torch.full((B, H), MASK, device=images.device)
    actions = model(images, words, all_masked).argmax(-1)
    if not refine:
        return actions, None
    needs_energy = trace or planning.accept == "lower"
    E = energy(model, images, words, actions) if needs_energy else None
    energies = [E]
    for _ in range(planning.iterations):
        order = torch.rand(B, H, generator=gen, device=gen.device).argsort(1)
        pos = order[:, : planning.resample].to(actions.device)
        hide = torch.zeros_like(actions, dtype=torch.bool).scatter(1, pos, True)
        logits = model(images, words, actions.masked_fill(hide, MASK)).float()
        if planning.temperature > 0:
            probs = (logits / planning.temperature).softmax(-1).view(-1, N_ACTIONS).to(gen.device)
            new = torch.multinomial(probs, 1, generator=gen).view(B, H).to(actions.device)
        else:
            new = logits.argmax(-1)
        cand = torch.where(hide, new, actions)
        if planning.accept == "all":
            actions = cand
            E = energy(model, images, words, cand) if needs_energy else None
        else:
            E_cand = energy(model, images, words, cand)
            keep = E_cand <= E
            actions = torch.where(keep[:, None], cand, actions)
            E = torch.where(keep, E_cand, E)
        energies.append(E)
    return actions, torch.stack(energies, 1) if trace else None


def timed_plans(model, images, words, H: int, planning: Planning, gen, refine: bool):
    """The plans (lists) and their energy trace, and the seconds they took with the trace and
    without it. Under `--accept all` the energy serves the trace only: the same plans are made first
    without it, from the same random state, and timed apart. Under `--accept lower` the rule needs
    the energy anyway."""
    untraced = None
    if refine and planning.accept == "all":
        state, t0 = gen.get_state(), time.perf_counter()
        bare, _ = plan(model, images, words, H, planning, gen, refine, trace=False)
        bare.tolist()  # waits for the device: nothing else is queued
        untraced = time.perf_counter() - t0
        gen.set_state(state)
    t0 = time.perf_counter()
    actions, energies = plan(model, images, words, H, planning, gen, refine)
    plans = actions.tolist()
    wait_for(actions.device)  # the trace's last energy may still run after the plans are read
    traced = time.perf_counter() - t0
    return plans, energies, traced, traced if untraced is None else untraced


# --- Evaluation: all episodes at once; every env whose plan is used up gets a new one in a shared
# batch.


def start_states(obs: list, M: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The planner's inputs from observations: grids (B, W, H, 3) and mission word ids (B, M)."""
    images = torch.as_tensor(np.stack([o["image"] for o in obs]), device=device).long()
    words = [tokenize(o["mission"], M) for o in obs]
    return images, torch.tensor(words, device=device).view(len(obs), M)


@torch.no_grad()
def evaluate(model, level: str, episodes: int, planning: Planning, refine: bool, seed: int) -> dict:
    """IEM (refine) or BC on `episodes` episodes of `level` with their own seeds, planned in
    batches with their own random generator: the training's random streams are left as they
    were."""
    n, H, device = episodes, model.horizon, next(model.parameters()).device
    envs = [make_env(level) for _ in range(n)]
    obs = [reset(env, EVAL_SEED_BASE + 1000 * seed + i) for i, env in enumerate(envs)]
    gen = torch.Generator(device=device).manual_seed(seed)
    returns, lengths = np.zeros(n), np.zeros(n, dtype=int)
    queue, alive = [[] for _ in range(n)], set(range(n))  # each env's actions left to execute
    traces, seconds, untraced_seconds, calls, planned = [], 0.0, 0.0, 0, 0
    was_training = model.training
    model.eval()
    name = "IEM" if refine else "BC"
    bar = tqdm(total=n, desc=f"evaluate {name}", unit="episode", leave=False, dynamic_ncols=True,
               mininterval=1.0)  # fmt: skip
    while alive:
        if need := sorted(i for i in alive if not queue[i]):
            t0 = time.perf_counter()
            images, words = start_states([obs[i] for i in need], model.mission_len, device)
            inputs = time.perf_counter() - t0
            timed = timed_plans(model, images, words, H, planning, gen, refine)
            plans, trace, traced, untraced = timed
            for i, p in zip(need, plans):
                queue[i] = p[: planning.replan_every or H]
            seconds += inputs + traced
            untraced_seconds += inputs + untraced
            calls, planned = calls + 1, planned + len(need)
            traces += [] if trace is None else [trace.cpu()]
        for i in sorted(alive):
            obs[i], r, term, trunc, _ = envs[i].step(queue[i].pop(0))
            returns[i], lengths[i] = returns[i] + r, lengths[i] + 1
            if term or trunc:
                alive.discard(i)
        bar.update(n - len(alive) - bar.n)
        bar.set_postfix(env_steps=int(lengths.sum()), planning_steps=planned, refresh=False)
    bar.close()
    model.train(was_training)
    timing = {"calls": calls, "planned": planned, "s": seconds, "untraced_s": untraced_seconds}
    return evaluation_summary(returns, lengths, traces, timing)


def evaluation_summary(returns, lengths, traces: list, timing: dict) -> dict:
    """Success rate and returns of the episodes, the planning cost per env step, and the mean
    energy after each refinement iteration."""
    success = returns > 0  # BabyAI rewards success only: 1 - 0.9 * steps / max_steps
    out = {"success_rate": float(success.mean()), "return_mean": float(returns.mean())}
    out |= {"planning_calls": timing["calls"], "plans": timing["planned"]}
    out |= {"returns": returns.tolist(), "lengths": lengths.tolist()}
    steps = lengths.sum()
    out |= {"planning_s_per_step": timing["s"] / steps}
    out |= {"planning_s_per_step_untraced": timing["untraced_s"] / steps}
    curve = torch.cat(traces).mean(0).tolist() if traces else None
    return out | {"energy_per_iteration": curve}


# --- Training: the paper's code's loop, then IEM and BC planned on the same evaluation episodes.


def train(args: Args) -> dict:
    """Updates of the masked model on batches of demonstration plans, then IEM (refined plans)
    against BC (the first fill alone) on the same evaluation episodes. A stop signal lets the update
    in progress finish, saves, and exits with the command that continues the run."""
    t_start = time.time()
    args, device, threads = start(args)
    ckpt, resume, demos, source, arch = load_run(args, device)
    data = make_dataset(demos, arch["mission_len"], device) if demos is not None else None
    run_dir, config = open_run(args, arch, ckpt, resume, demos, source, device, threads)
    model = MaskedPlanModel(**arch).to(device)
    if ckpt is not None:
        fit_weights(model, ckpt["model"], None if args.resume else run_dir)
    bf16 = args.bf16 and bf16_native(device)
    # training only: planning stays fp32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    print_banner(run_dir, config, model, arch, device)
    opt, sched = make_optimizer(model, args.lr, args.updates)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # the batch sampler's stream
    done, parent, clock = progress(run_dir, ckpt, resume, opt, sched, gen)
    step_fn, fwd = compiled_update(model, opt, device, args.compile)
    timer = Stopwatch(clock, device, warmup=COMPILE_WARMUP if args.compile else 0)
    saving = (run_dir, model, arch, args, opt, sched, gen, clock, t_start, parent)
    save = functools.partial(save_run, *saving)
    saved = done if resume else None  # the updates model.pt holds
    H, metrics = arch["horizon"], run_dir / "metrics.jsonl"
    bar = train_bar(done, args.updates)
    old_handlers = catch_stop_signals()
    try:
        for step in bar:
            with one_update(args, device, run_dir):  # a stop signal waits; an OOM is one line
                timer.start()
                batch = sample_batch(data, args.batch_size, H, gen)
                lr = sched.get_last_lr()[0]  # the rate this update uses
                losses, grad_norm = step_fn(fwd, opt, batch, args.train_all_masked, autocast)
                sched.step()
                done = step + 1
                timer.lap()
                if step % args.log_every == 0 or done == args.updates:
                    timer.stop()  # waits for the device, as the log line's .item() would
                    log_losses(metrics, step, losses, grad_norm, lr, bar)
            if save_due(done, args.updates, eval_every=0, save_every=args.save_every):
                timer.stop()
                saved = save(done)
        bar.close()
        planning, n = planning_of(args), args.eval_episodes
        with planning_memory(args, device, run_dir):  # an OOM is one line naming the flag
            iem = evaluate(model, args.env, n, planning, refine=True, seed=args.seed)
            bc = evaluate(model, args.env, n, planning, refine=False, seed=args.seed)
    except KeyboardInterrupt as stop:
        bar.close()
        timer.stop()
        if args.updates and saved != done:  # stopped in training: keep what it has learnt
            save(done)
        raise SystemExit(stopped(str(stop) or "Ctrl-C", args, parent + done, run_dir)) from None
    finally:
        restore_signals(old_handlers)
    timing = run_timing(clock, args.compile, bf16, t_start)
    return report(config, iem, bc, done, parent + done, run_dir, timing)


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


# The run flags' handling for iem.py: from flags to the method's settings, the run's folder,
# checkpoints and report.


def complete_and_check(args: Args) -> None:
    """Args.__post_init__: the flags left unset get the preset's or the level's value (the
    checkpoint's level without --env); a bad value, or a bad combination, exits with one line
    naming the flag."""
    if args.track and importlib.util.find_spec("wandb") is None:
        fix = 'pip install -e ".[track]" (or leave out --track)'
        raise SystemExit(f"error: --track needs wandb: {fix}.")
    if args.resume is not None:  # the other flags are the run's own (resumed_args)
        check_flags(args, "", "threads")
        return
    if args.env is None:  # the checkpoint's level (train() checks it again), else the default
        with contextlib.suppress(Exception):
            ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            args.env = ckpt["env"]
        args.env = args.env or DEFAULT_ENV
    if env_id(args.env) not in gym.registry:
        levels = ", ".join(PAPER_LEVELS)
        why = f"not a BabyAI level of minigrid; e.g. {levels}"
        raise SystemExit(f"error: --env {args.env}: {why}.")
    h, it = PAPER_LEVELS.get(env_id(args.env)[7:-3], (5, 9))
    for k, v in {**PRESETS[args.preset], "horizon": h, "iterations": it}.items():
        if getattr(args, k) is None:
            # during construction: the preset's or level's value for a flag left unset
            setattr(args, k, v)
    positive = "horizon resample collect n_layer n_head n_embd batch_size lr eval_episodes"
    non_negative = "seed iterations temperature updates threads save_every"
    check_flags(args, positive + " log_every", non_negative)
    H, rp, heads = args.horizon, args.replan_every, args.n_head
    bad_replan = rp is not None and not 1 <= rp <= H
    trains_nothing = args.updates == 0 and not args.checkpoint
    no_file = args.dataset and not Path(args.dataset).is_file()
    problems = [
        ("resample", args.resample > H, f"resample at most --horizon {H} tokens"),
        ("replan-every", bad_replan, f"execute 1..{H} (--horizon) actions"),
        ("n-embd", args.n_embd % heads, f"must be a multiple of --n-head {heads}"),
        ("dropout", not 0 <= args.dropout < 1, "must be in [0, 1)"),
        ("updates", trains_nothing, "trains nothing; add --checkpoint"),
        ("dataset", no_file, "no such file"),
    ]
    for flag, bad, hint in problems:
        value = getattr(args, flag.replace("-", "_"))
        if bad:
            raise SystemExit(f"error: --{flag} {value}: {hint}.")


def planning_of(args: Args) -> Planning:
    """The planner's settings among the flags."""
    names = [f.name for f in dataclasses.fields(Planning)]
    return Planning(**{k: getattr(args, k) for k in names})


def start(args: Args) -> tuple[Args, torch.device, int]:
    """--resume's own flags, then threads, seeds and the device."""
    if args.resume is not None and args.checkpoint is not None:
        why = "continues a run with its own model.pt; leave out --checkpoint"
        raise SystemExit(f"error: --resume {args.resume} {why}.")
    args = resumed_args(Args, args)
    device, threads = setup(args)
    return args, device, threads


def load_run(args: Args, device) -> tuple:
    """The checkpoint (--resume's or --checkpoint's) and its training state, the demos when training
    (and where they came from), and the architecture: the checkpoint's, whatever the flags say, else
    the flags' with the data's grid size and mission length."""
    run_ckpt = str(Path(args.resume) / "model.pt") if args.resume else None
    if args.resume:
        ckpt = load_checkpoint(run_ckpt, device, "--resume")
    else:
        ckpt = load_checkpoint(args.checkpoint, device)
    level = env_id(args.env)
    if ckpt is not None and ckpt["env"] != level:
        learnt = f"learnt {ckpt['env']}, not {level}; pass its --env"
        raise SystemExit(f"error: --checkpoint {args.checkpoint} {learnt}.")
    built_with = ckpt.get("env_args", {}) if ckpt is not None else None  # {}: doors as minigrid's
    if ckpt is not None and built_with != env_args(level):
        built = f"learnt {level} built with {built_with}, not LEAP's {env_args(level)}"
        raise SystemExit(f"error: --checkpoint {args.checkpoint} {built}; train a new model.")
    demos, source = None, None
    if args.updates:
        demos, source = load_demos(args.env, args.dataset, args.data_dir, args.collect)
    if ckpt is not None:
        arch = ckpt["arch"]
    else:
        grid = list(demos["images"].shape[1:3])
        mission_len = max(len(str(m).split()) for m in demos["missions"])
        arch = {k: getattr(args, k) for k in ARCH} | {"grid": grid, "mission_len": mission_len}
    if (args.replan_every or 0) > arch["horizon"]:
        why = f"the checkpoint plans {arch['horizon']} actions"
        raise SystemExit(f"error: --replan-every {args.replan_every}: {why}.")
    common.check_needs(memory_needs(args, arch, device), device)  # before the run folder
    return ckpt, (ckpt["resume"] if args.resume else None), demos, source, arch


def memory_needs(args: Args, arch: dict, device) -> dict:
    """What each memory-bound flag of this run needs (bytes, estimated): flag -> (value, bytes,
    what it sizes). The masked model is common.transformer_bytes' encoder over T = 1 + M + H
    tokens of every masked copy of a plan: H + 1 copies per plan in training (single_masks, the
    all-masked one with --train-all-masked), H per plan in planning (the energy's forward, the
    largest of plan()'s, no-grad and fp32), times TRAIN_FACTOR or PLAN_FACTOR, plus the grid
    encoder's CONV_VALUES values per cell of each egocentric grid, and per evaluation episode its
    env (ENV_BYTES)."""
    H, M, (W, Hg) = arch["horizon"], arch["mission_len"], arch["grid"]
    T, cells = 1 + M + H, (2 * max(W, Hg) - 1) ** 2
    model = (arch["n_embd"], arch["n_layer"], arch["n_head"])
    needs = {}
    if args.updates:
        bf16, B = args.bf16 and bf16_native(device), args.batch_size
        copies = B * (H + int(args.train_all_masked))
        need = TRAIN_FACTOR * common.transformer_bytes(copies, T, *model, bf16=bf16, device=device)
        needs["--batch-size"] = (B, need + 4.0 * CONV_VALUES * B * cells, "a training update")
    n = args.eval_episodes
    need = common.transformer_bytes(n * H, T, *model, bf16=False, train=False, device=device)
    need = PLAN_FACTOR * need + n * (4.0 * CONV_VALUES * cells + ENV_BYTES)
    needs["--eval-episodes"] = (n, need, "an evaluation (H masked copies of each plan)")
    return needs


@contextlib.contextmanager
def one_update(args: Args, device, run_dir: Path):
    """A training update and its log line: a stop signal waits for its end (signals_deferred), an
    allocation failure in it is one line naming --batch-size (common.out_of_memory; a run folder
    that logged nothing yet is removed)."""
    fresh = None if args.resume else run_dir
    oom = ("--batch-size", args.batch_size, device, "a training update", fresh)
    with signals_deferred(), common.out_of_memory(*oom):
        yield


def planning_memory(args: Args, device, run_dir: Path):
    """An allocation failure while IEM and BC plan: one line naming --eval-episodes (a run folder
    that logged nothing yet is removed)."""
    fresh = None if args.resume else run_dir
    n, what = args.eval_episodes, "an evaluation (H masked copies of each plan)"
    return common.out_of_memory("--eval-episodes", n, device, what, fresh)


def open_run(args: Args, arch: dict, ckpt, resume, demos, source, device, threads) -> tuple:
    """The run folder (--resume's own), its config.json and the W&B run of --track."""
    level = env_id(args.env)
    run_dir = Path(args.resume) if args.resume else make_run_dir(args, {"name": level})
    config = {"method": METHOD, "args": asdict(args), "arch": arch, "env": level}
    config["env_args"] = env_args(level)
    config["dataset"] = source
    config |= {"demos": len(demos["lengths"]) if demos else 0, "device": str(device)}
    config |= {"threads": threads, "git_commit": git_commit(), "torch": torch.__version__}
    # the flags the evaluated model was trained with: a checkpoint's when this run only evaluates it
    trained_with = ckpt["args"] if ckpt is not None and not args.updates else asdict(args)
    config["trained_with"] = trained_with
    config = record_config(run_dir, config, resume)
    start_tracking(args, config, run_dir)
    return run_dir, config


def print_banner(run_dir: Path, config: dict, model, arch: dict, device) -> None:
    n_params = sum(p.numel() for p in model.parameters())
    sizes = f"{config['demos']} demos, {n_params} parameters, H={arch['horizon']}"
    print(f"run {run_dir.name}: {sizes}, device {device}")


def progress(run_dir: Path, ckpt, resume, opt, sched, gen) -> tuple[int, int, dict]:
    """Where training starts: the updates done (a resumed run's), those of the checkpoint it started
    from (`parent`), and the time spent; a resumed run gets its training state and metrics back."""
    done = resume["updates_done"] if resume else 0
    parent = ckpt.get("trained_updates", 0) - done if ckpt is not None else 0
    clock = {"train_time_s": 0.0, "wall_time_s": 0.0, "timed_updates": done, "compile_time_s": 0.0}
    if resume:  # a run saved before the timing below: all its updates were timed
        clock |= resume["clock"]
    if resume:
        restore_training_state(resume, opt, sched, gen)
        trim_metrics(run_dir / "metrics.jsonl", resume["metrics_lines"])
    return done, parent, clock


# --compile: the updates of each process whose time is compile time, not training time (the first
# compiles; CUDA graphs are recorded after a warmup run)
COMPILE_WARMUP = 3
# memory_needs' constants: the grid encoder's fp32 values per cell of a grid (embeddings,
# convolutions, their gradients), one BabyAI env's memory (11 kB, 300 envs measured), and the
# factors on common.transformer_bytes for this encoder (fitted to dt.py's GPT; the short
# sequences of many masked copies keep more per token). Measured as common.py's constants
# (peak-RSS rise of a fresh process over 2 calls, 1 thread): training 0.88-1.05x of the measured
# 0.23-1.17 GB (batch 64-256, H 5-10, width 64-128, bf16 and fp32), planning 0.70-0.95x of
# 0.24-0.71 GB (256-1024 episodes at once, H 5-10).
CONV_VALUES = 150.0
ENV_BYTES = 0.011e6
TRAIN_FACTOR = 1.25
PLAN_FACTOR = 1.2


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


def train_bar(done: int, updates: int):
    """The training progress bar over the updates left (none when the run only evaluates)."""
    bar = dict(initial=done, dynamic_ncols=True, mininterval=1, disable=not updates)
    return tqdm(range(done, updates), "train", updates, **bar)


def make_checkpoint(model, arch, args, level: str, total: int, state: dict) -> dict:
    """model.pt: the weights with what planning with them needs (architecture, level), and the
    training state that --resume continues from."""
    parts = {"method": METHOD, "arch": arch, "env": level, "env_args": env_args(level)}
    parts["args"] = asdict(args)
    return {"model": model.state_dict(), **parts, "trained_updates": total, "resume": state}


def save_run(run_dir, model, arch, args, opt, sched, gen, clock, t_start, parent, n: int) -> int:
    """model.pt after `n` updates here (`parent` before), resumable; returns n."""
    wall = {"wall_time_s": clock["wall_time_s"] + time.time() - t_start}
    state = training_state(n, opt, sched, gen, clock | wall, run_dir / "metrics.jsonl")
    ckpt = make_checkpoint(model, arch, args, env_id(args.env), parent + n, state)
    save_atomic(ckpt, run_dir / "model.pt")
    return n


def stopped(why: str, args: Args, total: int, run_dir: Path) -> str:
    """What a stopped run says: a training run the command that continues it (its model.pt holds
    `total` updates), an evaluation where its folder is."""
    if args.updates:
        return stop_message(why, total, run_dir)
    return f"interrupted ({why}) during the evaluation; {run_dir} keeps what it logged."


def report(config: dict, iem: dict, bc: dict, done: int, total: int, run_dir, timing: dict) -> dict:
    """results.json, the final metrics line and the printed summary."""
    curve, args = iem["energy_per_iteration"], config["args"]
    success = {"iem_success": iem["success_rate"], "bc_success": bc["success_rate"]}
    log_metrics(run_dir / "metrics.jsonl", step=done, **success, energy=curve)
    results = config | {"updates": done, "trained_updates": total, "iem": iem, "bc": bc}
    results |= {"energy_drop": curve[0] - curve[-1], "run_dir": str(run_dir), **timing}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    finish_tracking(results)
    ms_iem, ms_bc = 1e3 * iem["planning_s_per_step"], 1e3 * bc["planning_s_per_step"]
    ms_untraced = 1e3 * iem["planning_s_per_step_untraced"]
    success = f"success IEM {iem['success_rate']:.2f}, BC {bc['success_rate']:.2f}"
    returns = f"returns {iem['return_mean']:.3f}, {bc['return_mean']:.3f}"
    energy = f"energy {curve[0]:.2f} -> {curve[-1]:.2f} over {args['iterations']} refinements"
    episodes = f"{config['env']}, {args['eval_episodes']} episodes"
    untraced = f"{ms_untraced:.1f} without the energy trace"
    cost = f"planning {ms_iem:.1f} ms/step, {untraced} (BC {ms_bc:.1f})"
    print(f"{episodes}: {success} ({returns}); {energy}; {cost}")
    print(f"results: {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
