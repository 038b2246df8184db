"""Iterative energy minimization (LEAP; Chen et al., "Planning with Sequence Models through Iterative Energy
Minimization", ICLR 2023) on BabyAI: the blog's third system (§5.c), a BERT-like bidirectional masked model over a
whole plan of actions, used as an energy function and minimized by iterative Gibbs-style refinement.

    python iem.py --env GoToLocalS7N5 --preset cpu      # bot demos collected on first use; minutes on 2 CPU cores
    python iem.py --env GoToObjMazeS4                   # the paper's settings for the level (H=10, 29 refinements)
    python iem.py --env GoToLocalS7N5 --checkpoint runs/RUN/model.pt --updates 0 --iterations 30   # only plan

One file: arguments, data (minigrid's BabyAI bot), model, planning, evaluation (IEM against the BC baseline: the
same network, one forward, no refinement), training. benchmarks/iem_analysis.py measures the blog's §7.b claims.
Blocks marked PLUMBING are the same, byte for byte, as in dt.py and the other method files.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
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

# The paper's BabyAI levels with its code's planning settings (test_run.sh): horizon H and refinements. Its
# `sample_iteration` counts the first fill of all positions as an iteration, so its 10 is our 9. Its
# GoToObjMazeS4R2Close is minigrid's GoToObjMazeS4R2 (doors closed by default).
PAPER_LEVELS = {"GoToLocalS7N5": (5, 9), "GoToLocalS8N7": (5, 9), "PickupLoc": (5, 9), "GoToObjMazeS4R2": (5, 9),
                "GoToObjMazeS4": (10, 29), "GoToObjMazeS7": (10, 29)}  # fmt: skip
# Budgets. paper: its code's width 128 and 200 epochs over 500 demos in batches of 64 (1600 updates); cpu: narrower,
# more demos, minutes on 2 CPU cores.
PRESETS = {"paper": dict(n_embd=128, updates=1600, collect=500), "cpu": dict(n_embd=64, updates=1000, collect=5000)}
N_ACTIONS = 7  # minigrid: left, right, forward, pickup, drop, toggle, done
MASK, PAD = N_ACTIONS, N_ACTIONS + 1  # plan-token ids after the actions
AGENT = 10  # minigrid's OBJECT_TO_IDX["agent"]
# The words of the BabyAI grammar (minigrid.envs.babyai.core.verifier); any other word is UNK.
WORDS = ("a", "the", "go", "to", "pick", "up", "open", "put", "next", "and", "then", "after", "you", "your", "on",
         "left", "right", "in", "front", "of", "behind", "door", "ball", "box", "key", "red", "green", "blue",
         "purple", "yellow", "grey")  # fmt: skip
METHOD = "iem"
DEFAULT_ENV = "GoToLocalS7N5"  # the level without --env or --checkpoint
ARCH = "horizon n_layer n_head n_embd dropout".split()  # with the grid size and mission length of the data
EVAL_SEED_BASE = 1_000_000_000  # evaluation episodes never reuse a demonstration's seed (demos use 0..N-1)


@dataclass
class Args:
    env: str | None = None
    """BabyAI level of minigrid, short (GoToLocalS7N5, GoToObjMazeS4, PickupLoc, ...) or full (BabyAI-...-v0).
    Default: the checkpoint's level, else GoToLocalS7N5"""
    preset: Literal["paper", "cpu"] = "paper"
    """budget for the flags left unset: `paper` (n-embd 128, 1600 updates, 500 demos) or `cpu` (64, 1000, 5000)"""
    dataset: str | None = None
    """your demos instead of the bot's: an .npz of images (N, W, H, 3), actions (N,), lengths (E,), missions (E,)"""
    data_dir: str = "~/.cache/seqrl/babyai"
    """where bot demonstrations are cached as `{level}__bot{N}.npz`; nothing is downloaded"""
    collect: int | None = None
    """bot demonstrations (episode seeds 0..N-1) collected on first use and cached; default: the preset's"""
    exp_name: str = METHOD
    """experiment name, part of the run name `{env}__{exp_name}__{seed}__{time}`"""
    seed: int = 0
    """seed of python, numpy, torch, the batch sampler, the planner and the evaluation episodes"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    horizon: int | None = None
    """H, action tokens per plan; default: the paper's for --env (PAPER_LEVELS), else 5"""
    iterations: int | None = None
    """refinement iterations after the first fill; default: the paper's for --env (PAPER_LEVELS), else 9"""
    resample: int = 1
    """plan tokens masked and resampled per iteration (the paper's code: 1)"""
    temperature: float = 1.0
    """of the resampled tokens: 1 samples the conditionals (Gibbs, the paper's text), 0 argmax (the paper's code)"""
    accept: Literal["lower", "all"] = "lower"
    """`lower`: keep a resampled plan only if its energy does not rise; `all`: keep every sample (plain Gibbs)"""
    replan_every: int | None = None
    """actions executed from each plan before replanning; default: H (the paper's code executes the whole plan)"""
    train_all_masked: bool = True
    """also train each plan fully masked (where planning starts, and the BC baseline's input); the paper masks
    one action at a time only"""
    n_layer: int = 3
    """transformer blocks (the paper's 3)"""
    n_head: int = 4
    """attention heads per block (the paper's 4)"""
    n_embd: int | None = None
    """embedding width; default: the preset's (the paper's 128)"""
    dropout: float = 0.1
    """dropout on embeddings, attention weights and residual branches (the paper's 0.1)"""
    batch_size: int = 64
    """demonstration plans per update (the paper's 64); each is trained as its H (+1) masked copies"""
    lr: float = 6e-4
    """AdamW peak learning rate (the paper's); linear warmup over 5% of the updates, cosine decay to 10%"""
    updates: int | None = None
    """gradient updates; default: the preset's. With --checkpoint, 0 only evaluates it"""
    eval_episodes: int = 100
    """evaluation episodes, planned together in batches; the same episodes for IEM and BC"""
    bf16: bool = True
    """bfloat16 autocast for training where the hardware has it natively (CUDA; CPUs with AVX512-BF16 or AMX)"""
    checkpoint: str | None = None
    """a `model.pt` of an earlier run: start from its weights and architecture (--n-layer, --n-head, --n-embd and
    --horizon are then the checkpoint's); with --updates 0 only evaluate it"""
    runs_dir: str = "runs"
    """parent folder of the run folder"""
    log_every: int = 50
    """log the training loss every N updates"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1; all of them slow down
    sharply when another program keeps one busy)"""

    def __post_init__(self):
        if self.env is None:  # the checkpoint's level (train() reads and checks it again), else the default
            with contextlib.suppress(Exception):
                self.env = torch.load(self.checkpoint, map_location="cpu", weights_only=True)["env"]
            self.env = self.env or DEFAULT_ENV
        if env_id(self.env) not in gym.registry:
            levels = ", ".join(PAPER_LEVELS)
            raise SystemExit(f"error: --env {self.env}: not a BabyAI level of minigrid; e.g. {levels}.")
        h, it = PAPER_LEVELS.get(env_id(self.env)[7:-3], (5, 9))
        for k, v in {**PRESETS[self.preset], "horizon": h, "iterations": it}.items():
            if getattr(self, k) is None:
                setattr(self, k, v)  # during construction: the preset's or level's value for a flag left unset
        check_flags(self, "horizon resample collect n_layer n_head n_embd batch_size lr eval_episodes log_every",
                    "seed iterations temperature updates threads")  # fmt: skip
        H, rp = self.horizon, self.replan_every
        problems = [("resample", self.resample > H, f"resample at most --horizon {H} tokens"),
                    ("replan-every", rp is not None and not 1 <= rp <= H, f"execute 1..{H} (--horizon) actions"),
                    ("n-embd", self.n_embd % self.n_head, f"must be a multiple of --n-head {self.n_head}"),
                    ("dropout", not 0 <= self.dropout < 1, "must be in [0, 1)"),
                    ("updates", self.updates == 0 and not self.checkpoint, "trains nothing; add --checkpoint"),
                    ("dataset", self.dataset and not Path(self.dataset).is_file(), "no such file")]  # fmt: skip
        for flag, bad, hint in problems:
            value = getattr(self, flag.replace("-", "_"))
            if bad:
                raise SystemExit(f"error: --{flag} {value}: {hint}.")


# --- Data: minigrid's BabyAI bot on fully observed grids, cached as .npz; on the device as flat tensors. ---


def env_id(name: str) -> str:
    return name if name.startswith("BabyAI-") else f"BabyAI-{name}-v0"


def make_env(level: str):
    """Fully observed (the paper plans from the full image too): obs["image"] is (W, H, 3) of minigrid's (object,
    colour, state) codes, the agent and its direction in its cell."""
    return FullyObsWrapper(gym.make(env_id(level)))


def reset(env, seed: int):
    with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints every rejected level layout
        return env.reset(seed=seed)[0]


def tokenize(mission: str, length: int) -> list[int]:
    """Mission words as ids (0 PAD, 1 UNK, then WORDS), cut or padded to `length`."""
    ids = [WORDS.index(w) + 2 if w in WORDS else 1 for w in mission.replace(",", "").split()][:length]
    return ids + [0] * (length - len(ids))


def collect_demos(level: str, n: int, path: Path) -> None:
    """Episodes of minigrid's BabyAI bot (`BabyAIBot(env).replan()` once per step) on seeds 0..n-1; failures are
    left out. Written to a temporary name first, so an interrupted collection leaves no cache behind."""
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
    arrays = {"images": np.stack(images).astype(np.uint8), "actions": np.array(actions), "lengths": np.array(lengths)}
    np.savez_compressed(tmp, missions=np.array(missions), **arrays)
    os.replace(tmp, path)


def load_demos(args: Args) -> tuple[dict, str]:
    level = env_id(args.env)
    path = Path(args.dataset) if args.dataset else Path(args.data_dir).expanduser() / f"{level}__bot{args.collect}.npz"
    if args.dataset is None and not path.exists():
        collect_demos(level, args.collect, path)
    try:
        with np.load(path) as z:
            d = {k: z[k] for k in ("images", "actions", "lengths", "missions")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        why = f"{e.__class__.__name__}: {e}"
        raise SystemExit(
            f"error: --dataset {path}: not an .npz of images, actions, lengths, missions ({why})."
        ) from None
    n, grid = len(d["actions"]), make_env(level).observation_space["image"].shape
    ok = d["images"].shape == (n, *grid) and d["lengths"].sum() == n and len(d["missions"]) == len(d["lengths"])
    if not ok:
        shapes = {k: v.shape for k, v in d.items()}
        raise SystemExit(f"error: --dataset {path}: arrays {shapes} are not episodes of {level} (grids {grid}).")
    return d, str(path)


def make_dataset(d: dict, mission_len: int, device: torch.device) -> dict:
    ep = np.repeat(np.arange(len(d["lengths"])), d["lengths"])
    words = np.array([tokenize(str(m), mission_len) for m in d["missions"]], np.int64).reshape(-1, mission_len)
    arrays = {"images": d["images"], "actions": d["actions"], "end": np.cumsum(d["lengths"])[ep], "words": words[ep]}
    return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}


def sample_batch(data: dict, batch_size: int, H: int, gen: torch.Generator):
    """Plans of H actions from uniformly drawn steps; past the episode's end a plan holds PAD tokens (inputs saying
    that the mission is done, never targets), as in the paper's code."""
    n = len(data["actions"])
    idx = torch.randint(n, (batch_size,), generator=gen, device=gen.device)
    steps = idx[:, None] + torch.arange(H, device=idx.device)
    valid = steps < data["end"][idx, None]
    plan = torch.where(valid, data["actions"][steps.clamp(max=n - 1)], PAD)
    return data["images"][idx].long(), data["words"][idx], plan, valid


# --- Model: a bidirectional encoder over [start observation, mission words, a_1..a_H]; logits per plan token. ---


def egocentric(images: torch.Tensor) -> torch.Tensor:
    """(B, W, H, 3) fully observed grids -> (B, S, S, 3), S = 2 max(W, H) - 1, re-centred on the agent and turned
    so that it faces up (row 0 = farthest ahead); cells off the grid are 0 ('unseen'). Our choice: the paper feeds
    the absolute image plus the agent's and the goal's positions (the goal from the bot, privileged); invariance to
    translation and rotation lets a small model learn from few demos, without the goal."""
    B, W, H, _ = images.shape
    R, b = max(W, H) - 1, torch.arange(B, device=images.device)
    where = (images[..., 0] == AGENT).flatten(1).float().argmax(1)
    ax, ay = where // H, where % H
    dirs = torch.tensor([[1, 0], [0, 1], [-1, 0], [0, -1]], device=images.device)[images[b, ax, ay, 2]]  # DIR_TO_VEC
    dx, dy, ax, ay = dirs[:, 0, None, None], dirs[:, 1, None, None], ax[:, None, None], ay[:, None, None]
    off = torch.arange(-R, R + 1, device=images.device)
    ahead, right = -off[None, :, None], off[None, None, :]  # row r is R - r cells ahead, column c is c - R right
    x, y = ax + ahead * dx - right * dy, ay + ahead * dy + right * dx  # minigrid's right_vec is (-dy, dx)
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    return images[b[:, None, None], x.clamp(0, W - 1), y.clamp(0, H - 1)] * inside[..., None]


class EncoderBlock(nn.Module):
    """Pre-LayerNorm block with GELU, as the minGPT block of the paper's code, without its causal mask."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2, self.drop = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd), nn.Dropout(dropout)
        self.attn = nn.MultiheadAttention(n_embd, n_head, dropout=dropout, batch_first=True)
        mlp = (nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))
        self.mlp = nn.Sequential(*mlp)

    def forward(self, x, hidden_keys, return_attn=False):
        h = self.ln1(x)
        y, att = self.attn(h, h, h, key_padding_mask=hidden_keys, need_weights=return_attn, average_attn_weights=False)
        x = x + self.drop(y)
        return x + self.mlp(self.ln2(x)), att


class IEM(nn.Module):
    def __init__(self, grid, mission_len, horizon, n_layer, n_head, n_embd, dropout):
        super().__init__()
        S = 2 * max(grid) - 1
        self.cells = nn.ModuleList(nn.Embedding(n, 16) for n in (11, 6, 4))  # minigrid's object, colour, state codes
        convs = (nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())
        self.conv = nn.Sequential(*convs, nn.Flatten(), nn.Linear(32 * ((S + 1) // 2) ** 2, n_embd))
        self.word = nn.Embedding(len(WORDS) + 2, n_embd)
        self.act = nn.Embedding(N_ACTIONS + 2, n_embd)  # the actions, MASK, PAD
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + mission_len + horizon, n_embd))  # one per sequence slot
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, N_ACTIONS)  # never predicts MASK or PAD, like the paper's action head

    def forward(self, images, words, plan, copies=1, return_attn=False):
        """images (B, W, H, 3), words (B, M), plan (B * copies, H) tokens, each context serving `copies` consecutive
        plans (the masked copies of one plan). Returns logits (B * copies, H, N_ACTIONS) and, with return_attn, per
        block the attention weights (B * copies, n_head, T, T), T = 1 + M + H: [obs, words, plan]."""
        ego = egocentric(images)
        obs = self.conv(sum(e(ego[..., i]) for i, e in enumerate(self.cells)).permute(0, 3, 1, 2))
        ctx = torch.cat([obs[:, None], self.word(words)], 1).repeat_interleave(copies, 0)
        x = self.drop(torch.cat([ctx, self.act(plan)], 1) + self.pos)
        # Bidirectional (blog §5.c): no causal mask; every token sees every real token, earlier and later plan steps
        # alike. Only padded mission words are hidden.
        hidden = F.pad(words == 0, (1, plan.shape[1])).repeat_interleave(copies, 0)
        attns = []
        for block in self.blocks:
            x, att = block(x, hidden, return_attn)
            attns.append(att)
        return self.head(self.ln_f(x[:, -plan.shape[1] :])), attns


def single_masks(plan: torch.Tensor, all_masked: bool = False):
    """Masked copies of each plan: copy j hides action j (one token at a time, the paper's masking, whose NLLs are
    the energy's terms), plus a fully masked copy if asked. Returns (copies (B*C, H), hidden (B*C, H), C)."""
    B, H = plan.shape
    hide = torch.eye(H, dtype=torch.bool, device=plan.device)
    hide = torch.cat([hide, torch.ones_like(hide[:1])]) if all_masked else hide
    return plan.repeat_interleave(len(hide), 0).masked_fill(hide.repeat(B, 1), MASK), hide.repeat(B, 1), len(hide)


def masked_loss(model, images, words, plan, valid, all_masked):
    """Cross-entropy of the hidden actions given the rest: the training loss of a masked language model."""
    copies, hidden, C = single_masks(plan, all_masked)
    target = hidden & valid.repeat_interleave(C, 0)
    logits = model(images, words, copies, copies=C)[0]
    return F.cross_entropy(logits[target].float(), plan.repeat_interleave(C, 0)[target])


# --- Planning: iterative energy minimization (the paper's §3, blog §5.c). ---


@torch.no_grad()
def energy(model, images, words, plan) -> torch.Tensor:
    """E(tau) = sum_t -log p(a_t | s_0, mission, tau without a_t): the negative pseudo-log-likelihood of the masked
    model, the paper's trajectory energy; one batched forward over the H single-masked copies. Returns (B,)."""
    B, H = plan.shape
    copies, hidden, _ = single_masks(plan)
    logits = model(images, words, copies, copies=H)[0]
    nll = -logits[hidden].float().log_softmax(-1).gather(1, plan.reshape(-1, 1))  # rows in (plan, position) order
    return nll.view(B, H).sum(1)


@torch.no_grad()
def plan_actions(model, images, words, args: Args, H: int, gen: torch.Generator, refine: bool = True):
    """The all-masked plan filled in one forward (argmax: the first iteration of the paper's code, and alone the BC
    baseline); then `args.iterations` times mask `args.resample` random positions, resample them from the model at
    `args.temperature`, and keep the candidate if its energy did not rise (`--accept lower`) or always (`all`).
    Returns the plans (B, H) and the energy after every iteration (B, iterations + 1), or None without refining."""
    B = len(images)
    plan = model(images, words, torch.full((B, H), MASK, device=images.device))[0].argmax(-1)
    if not refine:
        return plan, None
    E = energy(model, images, words, plan)
    trace = [E]
    for _ in range(args.iterations):
        pos = torch.rand(B, H, generator=gen, device=gen.device).argsort(1)[:, : args.resample].to(plan.device)
        hide = torch.zeros_like(plan, dtype=torch.bool).scatter(1, pos, True)
        logits = model(images, words, plan.masked_fill(hide, MASK))[0].float()
        if args.temperature > 0:
            probs = (logits / args.temperature).softmax(-1).view(-1, N_ACTIONS).to(gen.device)
            new = torch.multinomial(probs, 1, generator=gen).view(B, H).to(plan.device)
        else:
            new = logits.argmax(-1)
        cand = torch.where(hide, new, plan)
        E_cand = energy(model, images, words, cand)
        keep = E_cand <= E if args.accept == "lower" else torch.ones_like(E, dtype=torch.bool)
        plan, E = torch.where(keep[:, None], cand, plan), torch.where(keep, E_cand, E)
        trace.append(E)
    return plan, torch.stack(trace, 1)


# --- Evaluation: all episodes at once; every env whose plan is used up gets a new one in a shared batch. ---


@torch.no_grad()
def evaluate(model, args: Args, arch: dict, device, refine: bool, seed: int) -> dict:
    n, H, M = args.eval_episodes, arch["horizon"], arch["mission_len"]
    envs = [make_env(args.env) for _ in range(n)]
    obs = [reset(env, EVAL_SEED_BASE + 1000 * seed + i) for i, env in enumerate(envs)]
    gen = torch.Generator(device=device).manual_seed(seed)
    returns, lengths, queue, alive = np.zeros(n), np.zeros(n, dtype=int), [[] for _ in range(n)], set(range(n))
    traces, plan_time, calls, was_training = [], 0.0, 0, model.training
    model.eval()
    while alive:
        if need := sorted(i for i in alive if not queue[i]):
            t0 = time.perf_counter()
            images = torch.as_tensor(np.stack([obs[i]["image"] for i in need]), device=device).long()
            words = torch.tensor([tokenize(obs[i]["mission"], M) for i in need], device=device).view(len(need), M)
            plan, trace = plan_actions(model, images, words, args, H, gen, refine)
            for i, p in zip(need, plan.tolist()):
                queue[i] = p[: args.replan_every or H]
            plan_time, calls = plan_time + time.perf_counter() - t0, calls + 1
            traces += [] if trace is None else [trace.cpu()]
        for i in sorted(alive):
            obs[i], r, term, trunc, _ = envs[i].step(queue[i].pop(0))
            returns[i], lengths[i] = returns[i] + r, lengths[i] + 1
            if term or trunc:
                alive.discard(i)
    model.train(was_training)
    success = returns > 0  # BabyAI rewards success only: 1 - 0.9 * steps / max_steps
    out = {"success_rate": float(success.mean()), "return_mean": float(returns.mean()), "planning_calls": calls}
    out |= {"returns": returns.tolist(), "lengths": lengths.tolist(), "planning_s_per_step": plan_time / lengths.sum()}
    return out | {"energy_per_iteration": torch.cat(traces).mean(0).tolist() if traces else None}


# --- Training ---


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


def git_commit() -> Optional[str]:
    """PLUMBING"""
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True)
        return git.stdout.decode().strip() if git.returncode == 0 else None
    except Exception:
        return None


def train(args: Args) -> dict:
    t_start = time.time()
    device, threads = setup(args)
    ckpt = load_checkpoint(args.checkpoint, device)
    level = env_id(args.env)
    if ckpt is not None and ckpt["env"] != level:
        raise SystemExit(f"error: --checkpoint {args.checkpoint} learnt {ckpt['env']}, not {level}; pass its --env.")
    demos, source = load_demos(args) if args.updates else (None, None)
    if ckpt is not None:
        arch = ckpt["arch"]  # the checkpoint's architecture, whatever the flags say
    else:
        grid, mission_len = list(demos["images"].shape[1:3]), max(len(str(m).split()) for m in demos["missions"])
        arch = {k: getattr(args, k) for k in ARCH} | {"grid": grid, "mission_len": mission_len}
    if (args.replan_every or 0) > arch["horizon"]:
        raise SystemExit(f"error: --replan-every {args.replan_every}: the checkpoint plans {arch['horizon']} actions.")
    data = make_dataset(demos, arch["mission_len"], device) if demos is not None else None
    run_dir = make_run_dir(args, {"name": level})
    metrics = run_dir / "metrics.jsonl"
    config = {"method": METHOD, "args": asdict(args), "arch": arch, "env": level, "dataset": source}
    config |= {"demos": len(demos["lengths"]) if demos else 0, "device": str(device), "threads": threads}
    config |= {"git_commit": git_commit(), "torch": torch.__version__}
    config["trained_with"] = ckpt["args"] if ckpt is not None and not args.updates else asdict(args)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))

    model = IEM(**arch).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    # The paper's code's optimiser: AdamW (0.9, 0.95), decay 0.1 on weight matrices, gradient norm clipped at 1.
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.updates // 20)

    def lr_factor(step):  # linear warmup, then cosine decay to 10%: the paper's code's schedule
        cosine = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.updates - warmup)))
        return min((step + 1) / warmup, max(0.1, cosine))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    bf16 = args.bf16 and bf16_native(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # training only: planning stays fp32
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"run {run_dir.name}: {config['demos']} demos, {n_params} parameters, H={arch['horizon']}, device {device}")

    trained, train_time = 0, 0.0
    if args.updates:
        bar = tqdm(range(args.updates), desc="train", dynamic_ncols=True, mininterval=1.0)
        try:
            for step in bar:
                t0 = time.time()
                images, words, plan, valid = sample_batch(data, args.batch_size, arch["horizon"], gen)
                with autocast:
                    loss = masked_loss(model, images, words, plan, valid, args.train_all_masked)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                trained = step + 1
                if step % args.log_every == 0 or trained == args.updates:  # .item() syncs the GPU: not every step
                    value = loss.item()
                    log_metrics(metrics, step=step, loss=value, grad_norm=grad_norm.item(), lr=sched.get_last_lr()[0])
                    bar.set_postfix(loss=f"{value:.3f}")
                train_time += time.time() - t0
        except KeyboardInterrupt:
            bar.close()
            print(f"\ninterrupted (Ctrl-C) after {trained} updates: saving the model trained so far")
        total = trained + (ckpt.get("trained_updates", 0) if ckpt is not None else 0)
        parts = {"method": METHOD, "arch": arch, "env": level, "args": asdict(args), "trained_updates": total}
        torch.save({"model": model.state_dict(), **parts}, run_dir / "model.pt")
        if trained < args.updates:
            raise SystemExit(f"stopped: {run_dir / 'model.pt'} holds {total} updates; evaluate it with --updates 0.")

    iem, bc = (evaluate(model, args, arch, device, refine=m == "iem", seed=args.seed) for m in ("iem", "bc"))
    curve = iem["energy_per_iteration"]
    log_metrics(metrics, step=trained, iem_success=iem["success_rate"], bc_success=bc["success_rate"], energy=curve)
    results = config | {"updates": trained, "iem": iem, "bc": bc, "energy_drop": curve[0] - curve[-1]}
    results |= {"run_dir": str(run_dir), "train_updates_per_s": trained / train_time if trained else None}
    results |= {"wall_time_s": time.time() - t_start}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    ms_iem, ms_bc = 1e3 * iem["planning_s_per_step"], 1e3 * bc["planning_s_per_step"]
    print(f"{level}, {args.eval_episodes} episodes: success IEM {iem['success_rate']:.2f}, BC {bc['success_rate']:.2f} "
          f"(returns {iem['return_mean']:.3f}, {bc['return_mean']:.3f}); energy {curve[0]:.2f} -> {curve[-1]:.2f} over "
          f"{args.iterations} refinements; planning {ms_iem:.1f} ms/step (BC {ms_bc:.1f})")  # fmt: skip
    print(f"results: {run_dir / 'results.json'}")
    return results


if __name__ == "__main__":
    train(tyro.cli(Args, description=__doc__))
