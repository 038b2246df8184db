"""The blog's DT-versus-TT analyses (blog §7.b-§7.c, issue 17), for DT (dt.py) and TT (tt.py) on one
dataset.

    python benchmarks/tt_analysis.py --data-dir DIR   # trains DT and TT on DIR/{env}.hdf5, analyses
    python benchmarks/tt_analysis.py --dataset-path FILE \
        --dt-checkpoint A/model.pt --tt-checkpoint B/model.pt

Without --data-dir or --dataset-path the official D4RL file is read (downloaded once), as in the
method files.

Nine analyses, one figure each in --out (default: a new runs/tt_analysis__{time}) plus summary.json,
and a printed `blog claim | ours | random-init control | verdict` table:
  1 attention maps per layer (head mean) on the same dataset windows;  2 DT's return-to-go tracking;
  3 attention allocation over episode time (return tokens / recent steps / old steps);  4 attention
  mass against distance in timesteps;  5 head entropy per layer and head;  6 error propagation
  (defined below);  7 attention sparsity, mean and variance;  8 planning cost per episode against
  beam width K;  9 scores beside published ones.
Rows analysed in 3-7 are the ones whose output is the action: DT's last state token, TT's last
observation token and its action tokens but the last (they predict a^1..a^m_a). For TT, "return
tokens" are the reward tokens: no token may attend to a value token (TT code's mask). Numbers on a
replica are labelled replica, never D4RL.

Every attention and behaviour claim is judged beside random-init controls (dt.DecisionTransformer
and tt.TrajectoryTransformer constructed fresh from --control-seed, never trained): attention on the
very inputs ours sees (the same dataset windows, the contexts of our rollouts), behaviour on the
controls' own episodes with the same env seeds. A claim "holds" only where ours clears the control
by a stated margin (1.2x, a stated difference, or two standard errors over episodes), "does not
hold" where ours falls short of the control by more than the noise margin (level with it or short
where no noise margin is stated), and is "not decidable at this budget" in between, either way,
or where the budget decides it (benchmarks/attention.py, beyond_control). The table prints the
control's column beside ours.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import dt  # noqa: E402
import tt  # noqa: E402
from attention import (  # noqa: E402
    CONTROL_SEED,
    FAILS,
    HOLDS,
    MARGIN,
    UNDECIDED,
    all_of,
    beyond_control,
    random_init,
)  # noqa: E402

PUBLISHED = {
    "dt": 74.7,
    "tt": 78.9,
}  # blog §7.a = TT paper Table 1 means over 9 D4RL locomotion datasets
# "recent steps": at most this many timesteps back (the current step is 0); "old": further back
RECENT = 2
# Claim 2: "tracks" needs at least a tenth of a change in target to show in the return received. A
# stated floor: one policy's episodes barely differ, so a random-init policy's near-zero slope can
# have a near-zero spread.
TRACKING_FLOOR = 0.1
DT_KINDS = np.array(["return-to-go", "state", "action"])


def tt_kinds(model) -> np.ndarray:
    return np.array(["state"] * model.obs_dim + ["action"] * model.act_dim + ["reward", "value"])


@dataclass
class Args:
    env: str = "hopper-medium-replay"
    """dataset name (a D4RL name)"""
    data_dir: Optional[str] = None
    """folder holding `{env}.hdf5`, e.g. the replica datasets (see README's Data); or use
    --dataset-path"""
    dataset_path: Optional[str] = None
    """the D4RL-layout .hdf5 file itself; without it and --data-dir, the official D4RL file
    (downloaded once)"""
    out: Optional[str] = None
    """folder for the figures and summary.json (default: a new runs/tt_analysis__{unix time}); the
    committed results are regenerated with --out benchmarks/results/tt --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    runs_dir: str = "runs/tt_analysis"
    """where the DT and TT training runs go when no checkpoints are given"""
    dt_checkpoint: Optional[str] = None
    """a dt.py model.pt to analyse instead of training DT here"""
    tt_checkpoint: Optional[str] = None
    """a tt.py model.pt to analyse instead of training TT here"""
    dt_updates: int = 1500
    """DT updates when trained here (dt.py's defaults otherwise, warmup 300)"""
    tt_updates: int = 3000
    """TT updates when trained here (tt.py's CPU preset: n_embd 64, batch 32, seq_len 5, warmup 0.1
    epoch)"""
    beam_width: int = 8
    """TT's beam for the beam-search scores and error propagation (the CPU preset; the paper uses
    128)"""
    horizon: int = 5
    """TT's planning horizon in transitions (the CPU preset; the paper uses 15)"""
    eval_episodes: int = 5
    """episodes per model and decoding mode for analyses 2-5, 7 and 9"""
    eval_max_steps: int = 1000
    """cut every evaluation episode after this many steps (1000 = the env's limit: scores
    comparable)"""
    error_episodes: int = 6
    """dataset episodes replayed for the error-propagation analysis"""
    error_steps: int = 100
    """steps of each replayed episode"""
    windows: int = 32
    """dataset windows averaged into the attention maps"""
    beam_widths: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """K values of the compute-cost analysis"""
    cost_reps: int = 5
    """timed planning calls per K (the fastest counts)"""
    paper_speed: bool = True
    """also time TT at the paper's size (random weights): 3 training updates and 1 planning call
    (beam 128, horizon 15); takes a few minutes on a CPU"""
    seed: int = 0
    """seed of training, windows, replayed episodes and evaluation envs"""
    control_seed: int = CONTROL_SEED
    """seed of the random-init controls' weights (the models constructed fresh, never trained);
    their evaluation data keep --seed"""
    controls: int = 3
    """random-init control pairs (DT, TT), seeds --control-seed + 0, 1, ...: the behaviour claims
    (2, 6, 9) take their seed-to-seed spread as the noise margin; the attention claims use the first
    """
    track_fraction: float = 0.5
    """claim 2 (return-to-go tracking): DT and its control also run conditioned on this fraction of
    DT's target; tracking = how much of the change in target the returns received follow"""
    threads: int = 1
    """torch CPU threads (the machine is shared)"""
    iem_summary: str = "benchmarks/results/iem/summary.json"
    """IEM's head-averaged maps (benchmarks/iem_analysis.py), drawn as a third row of figure 1 when
    the file exists: DT, TT and IEM side by side (blog §7.b); its first level is used"""

    def __post_init__(self):
        for name in (
            "dt_updates",
            "tt_updates",
            "beam_width",
            "horizon",
            "eval_episodes",
            "eval_max_steps",
            "error_episodes",
            "error_steps",
            "windows",
            "cost_reps",
            "threads",
            "controls",
        ):
            if getattr(self, name) <= 0:
                raise SystemExit(
                    f"error: --{name.replace('_', '-')} {getattr(self, name)}: must be > 0."
                )
        if not 0 < self.track_fraction < 1:
            raise SystemExit(
                f"error: --track-fraction {self.track_fraction}: must be in (0, 1), e.g. 0.5."
            )
        if not self.beam_widths or min(self.beam_widths) < 1:
            raise SystemExit(f"error: --beam-widths {self.beam_widths}: give widths >= 1.")
        if self.data_dir is not None and self.dataset_path is not None:
            raise SystemExit(
                f"error: --data-dir {self.data_dir} and --dataset-path {self.dataset_path}: pass "
                "one of them."
            )


def dataset_paths(args: Args) -> tuple[str, ...]:
    """The file to read: --dataset-path, or {--data-dir}/{env}.hdf5; none (the official D4RL file)
    without both."""
    if args.dataset_path is not None:
        if not Path(args.dataset_path).is_file():
            raise SystemExit(
                f"error: --dataset-path {args.dataset_path}: no such file; pass a D4RL-layout "
                ".hdf5."
            )
        return (args.dataset_path,)
    if args.data_dir is not None:
        path = Path(args.data_dir) / f"{args.env}.hdf5"
        if not path.is_file():
            raise SystemExit(
                f"error: --data-dir {args.data_dir}: no {path.name} there; pass the folder of the "
                "replica (or your own D4RL-layout) files, or the file itself with --dataset-path."
            )
        return (str(path),)
    return ()


# --------------------------------------------------------------------------------------------------
# Models: trained here or loaded
# --------------------------------------------------------------------------------------------------


class DTPolicy:
    """dt.py's model behind one call, so that this file depends on dt.py's interface in one place
    only."""

    def __init__(self, ckpt: dict, device):
        arch = ckpt["arch"]
        self.arch, self.device = arch, device
        self.model = dt.DecisionTransformer(**arch).to(device).eval()
        self.model.load_state_dict(ckpt["model"])
        self.K, self.scale, self.max_ep_len = (
            arch["context_len"],
            arch["rtg_scale"],
            arch["max_ep_len"],
        )
        self.state_dim, self.act_dim = arch["state_dim"], arch["act_dim"]
        self.mean, self.std = (ckpt[k].float().to(device) for k in ("state_mean", "state_std"))
        domain = ckpt["dataset"]["env_id"].split("-")[0].lower()
        self.target = ckpt["args"].get("target_return") or dt.TARGET_RETURNS[domain]
        self.n_layer, self.n_head = len(self.model.blocks), self.model.blocks[0].attn.n_head

    def __call__(self, rtg, states, actions, timesteps):
        """Normalised states, scaled returns-to-go; returns the action means (B, K, m_a)."""
        x = {"rtg": rtg, "states": states, "actions": actions, "timesteps": timesteps}
        return self.model(x)["action"][0].float()

    def attention(self, rtg, states, actions, timesteps) -> tuple:
        """The action means and each block's attention weights (B, n_head, 3K, 3K)."""
        with captured_attention(self.model) as weights:
            actions = self(rtg, states, actions, timesteps)
        return actions, weights

    def control(self, seed: int) -> "DTPolicy":
        """The random-init control: the same class and architecture constructed fresh from `seed`,
        never trained, with this policy's state normalisation, return scale and target."""
        c = copy.copy(self)
        c.model = random_init(dt.DecisionTransformer, seed=seed, **self.arch).to(self.device)
        return c


def tt_size(ds: dict, targs) -> tuple:
    """tt.TrajectoryTransformer's arguments for a checkpoint's dataset facts and flags (no
    dropout)."""
    return (
        ds["obs_dim"],
        ds["act_dim"],
        targs.n_bins,
        targs.seq_len,
        targs.n_layer,
        targs.n_head,
        targs.n_embd,
        0.0,
    )


def get_dt(args: Args, paths: tuple, device) -> tuple:
    if args.dt_checkpoint is None:
        a = dt.Args(env=args.env, dataset_path=paths, updates=args.dt_updates, warmup_steps=300,
                    eval_every=0, eval_episodes=2, runs_dir=args.runs_dir, exp_name="dt_analysis",
                    seed=args.seed, threads=args.threads)  # fmt: skip
        res = dt.train(a)
        ckpt_path, info = (
            str(Path(res["run_dir"]) / "model.pt"),
            {"updates_per_s": res["train_updates_per_s"]},
        )
    else:
        ckpt_path, info = args.dt_checkpoint, {"checkpoint": args.dt_checkpoint}
    ckpt = dt.load_checkpoint(ckpt_path, device)
    policy = DTPolicy(ckpt, device)
    arch = ckpt["arch"]
    info.update(
        updates=ckpt["trained_updates"],
        n_layer=arch["n_layer"],
        n_head=arch["n_head"],
        n_embd=arch["n_embd"],
    )
    return policy, info


def get_tt(args: Args, paths: tuple, device) -> tuple:
    if args.tt_checkpoint is None:
        a = tt.Args(env=args.env, dataset_path=paths, n_embd=64, batch_size=32, seq_len=5,
                    warmup_epochs=0.1, updates=args.tt_updates, beam_width=1, eval_episodes=1,
                    eval_max_steps=10, runs_dir=args.runs_dir, exp_name="tt_analysis",
                    seed=args.seed, threads=args.threads)  # fmt: skip
        res = tt.train(a)
        ckpt_path, info = (
            str(Path(res["run_dir"]) / "model.pt"),
            {"updates_per_s": res["train_updates_per_s"]},
        )
    else:
        ckpt_path, info = args.tt_checkpoint, {"checkpoint": args.tt_checkpoint}
    ckpt = tt.load_checkpoint(ckpt_path, device)
    plan = {
        "beam_width": args.beam_width,
        "horizon": args.horizon,
        "eval_episodes": args.eval_episodes,
    }
    plan |= {
        "eval_max_steps": args.eval_max_steps,
        "seed": args.seed,
        "checkpoint": ckpt_path,
        "updates": 0,
    }
    targs = replace(tt.Args(**ckpt["args"]), **plan)
    model = tt.TrajectoryTransformer(*tt_size(ckpt["dataset"], targs))
    model.load_state_dict(ckpt["model"])
    info.update(
        updates=ckpt["trained_updates"],
        n_layer=targs.n_layer,
        n_head=targs.n_head,
        n_embd=targs.n_embd,
    )
    return model.to(device).eval(), tt.Discretizer(ckpt["edges"].to(device)), targs, info


def controls_of(pi: DTPolicy, tt_model, targs, args: Args, device) -> list[tuple]:
    """The random-init control pairs: DT and TT of our models' sizes constructed fresh from
    --control-seed + i, never trained."""
    size = tt_size({"obs_dim": tt_model.obs_dim, "act_dim": tt_model.act_dim}, targs)
    seeds = [args.control_seed + i for i in range(args.controls)]
    return [
        (pi.control(s), random_init(tt.TrajectoryTransformer, *size, seed=s).to(device))
        for s in seeds
    ]


# --------------------------------------------------------------------------------------------------
# Attention weights, captured with forward hooks (the models compute no weights of their own)
# --------------------------------------------------------------------------------------------------


def attention_weights(attn, x, allowed, past=None) -> torch.Tensor:
    """The weights (B, n_head, T, keys) of a dt.py or tt.py SelfAttention called on (x, allowed,
    past), recomputed with its own query/key projection: the model runs
    F.scaled_dot_product_attention, which returns no weights. `past`: tt.py's cached keys and values
    of the earlier tokens."""
    B, T, C = x.shape
    heads = (z.view(B, T, attn.n_head, C // attn.n_head) for z in attn.qkv(x).split(C, dim=2))
    q, k, _ = (z.transpose(1, 2) for z in heads)
    if past is not None:
        k = torch.cat([past[0], k], 2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
    return att.masked_fill(~allowed, float("-inf")).softmax(-1)


@contextlib.contextmanager
def captured_attention(model):
    """Inside the block, every forward of `model` appends each block's attention weights, in block
    order, to the list it yields; the hooks are removed after."""
    weights = []

    def hook(attn, args, kwargs, output):
        x, allowed, *rest = (*args, *kwargs.values())  # (x, allowed[, past]) however passed
        past = rest[0] if rest and isinstance(rest[0], tuple) else None  # only tt.py has a cache
        weights.append(attention_weights(attn, x, allowed, past).detach())

    handles = [b.attn.register_forward_hook(hook, with_kwargs=True) for b in model.blocks]
    try:
        yield weights
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def tt_attention(model, tokens: torch.Tensor) -> list:
    """Each block's attention weights (B, n_head, T, T) of a tt.py model on a full view."""
    with captured_attention(model) as weights:
        model(tokens)
    return weights


# --------------------------------------------------------------------------------------------------
# Attention statistics of the action-predicting rows (analyses 3, 4, 5, 7)
# --------------------------------------------------------------------------------------------------


class RowStats:
    """Running sums over rollout steps. atts: per layer (N, H, Q, T) for the Q action-predicting
    rows; allowed (Q, T); key_step (T,) timestep of each key; q_step: the current timestep; ret (T,)
    return tokens."""

    def __init__(self, n_layer: int, n_head: int, max_dist: int):
        self.alloc, self.alloc_n, self.alloc_uniform, self.alloc_uniform_t = {}, {}, np.zeros(3), {}
        self.dist, self.dist_uniform, self.n = np.zeros(max_dist + 1), np.zeros(max_dist + 1), 0
        self.ent, self.ent_norm = np.zeros((n_layer, n_head)), np.zeros((n_layer, n_head))
        self.gini, self.mean_w, self.var_w, self.cv2 = (np.zeros(n_layer) for _ in range(4))

    def add(self, t: int, atts, allowed, key_step, q_step: int, ret):
        A = torch.stack([a.float() for a in atts]).cpu()  # (L, N, H, Q, T)
        allowed, d = allowed.cpu(), (q_step - key_step).cpu()
        n_allowed = allowed.sum(-1).float()  # (Q,)
        N = A.shape[1]
        mean_rows = A.mean((0, 2))  # (N, Q, T) averaged over layers and heads
        ret_c = ret.cpu()
        parts = [
            (mean_rows * m).sum(-1).mean(-1)
            for m in (ret_c, ~ret_c & (d <= RECENT), ~ret_c & (d > RECENT))
        ]
        self.alloc[t] = self.alloc.get(t, 0) + torch.stack(parts, -1).sum(0).numpy()
        self.alloc_n[t] = self.alloc_n.get(t, 0) + N
        masks = (ret_c, ~ret_c & (d <= RECENT), ~ret_c & (d > RECENT))
        uniform = N * np.array([((allowed & m).sum(-1) / n_allowed).mean().item() for m in masks])
        self.alloc_uniform += uniform  # what uniform rows would give, at this step's context fill
        self.alloc_uniform_t[t] = self.alloc_uniform_t.get(t, 0) + uniform
        for k in range(len(self.dist)):
            sel = (d == k)[None, None, :] & allowed[None]
            self.dist[k] += (mean_rows * sel).sum(-1).mean(-1).sum().item()
            self.dist_uniform[k] += N * (sel[0].float().sum(-1) / n_allowed).mean().item()
        self.n += N
        logn = torch.log(n_allowed).clamp_min(1e-9)
        H = -(A * A.clamp_min(1e-12).log()).sum(-1)  # (L, N, H, Q)
        self.ent += H.mean(-1).sum(1).numpy()
        self.ent_norm += (H / logn).mean(-1).sum(1).numpy()
        w = A.masked_fill(~allowed, float("nan"))  # only allowed keys count
        srt = torch.sort(
            torch.nan_to_num(w, nan=float("inf")), -1
        ).values  # allowed weights first, ascending
        gini = []
        for q in range(
            A.shape[3]
        ):  # Gini coefficient of each row's allowed weights: 0 uniform, -> 1 one-hot
            m = int(n_allowed[q])
            x = srt[..., q, :m]
            i = torch.arange(1, m + 1, dtype=torch.float32)
            gini.append(((2 * i - m - 1) * x).sum(-1) / (m * x.sum(-1)))
        self.gini += torch.stack(gini, -1).mean((-1, -2)).sum(1).numpy()
        self.mean_w += torch.nanmean(w, -1).mean((-1, -2)).sum(1).numpy()
        var = torch.nanmean((w - torch.nanmean(w, -1, keepdim=True)) ** 2, -1)  # (L, N, H, Q)
        self.var_w += var.mean((-1, -2)).sum(1).numpy()
        self.cv2 += (
            (var * n_allowed**2).mean((-1, -2)).sum(1).numpy()
        )  # variance relative to a uniform row's mean

    def summary(self) -> dict:
        ts = sorted(self.alloc)
        alloc = np.array([self.alloc[t] / self.alloc_n[t] for t in ts])
        n = max(self.n, 1)
        dist, uni = self.dist / n, self.dist_uniform / n
        return {
            "alloc_t": ts,
            "alloc": alloc.tolist(),
            "alloc_uniform": (self.alloc_uniform / n).tolist(),
            "alloc_uniform_t": [(self.alloc_uniform_t[t] / self.alloc_n[t]).tolist() for t in ts],
            "alloc_labels": ["return tokens", f"recent (<= {RECENT} steps)", "old"],
            "mass_by_distance": dist.tolist(),
            "uniform_by_distance": uni.tolist(),
            "mean_lookback_steps": float(
                (np.arange(len(dist)) * dist).sum() / max(dist.sum(), 1e-12)
            ),
            "uniform_lookback_steps": float(
                (np.arange(len(uni)) * uni).sum() / max(uni.sum(), 1e-12)
            ),
            "entropy": (self.ent / n).tolist(),
            "entropy_normalized": (self.ent_norm / n).tolist(),
            "gini": (self.gini / n).tolist(),
            "mean_weight": (self.mean_w / n).tolist(),
            "var_weight": (self.var_w / n).tolist(),
            "cv2_weight": (self.cv2 / n).tolist(),
            "samples": self.n,
        }


# --------------------------------------------------------------------------------------------------
# Rollouts: DT (its return rule, attention and R-hat recorded) and TT (tt.evaluate with a hook)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def dt_rollouts(
    pi: DTPolicy, info, args: Args, device, control: Optional[DTPolicy] = None, target=None
) -> dict:
    """DT's evaluation (dt.evaluate's loop) conditioned on `target` (default DT's), recording R-hat,
    the states visited and the attention of every step; with `control`, also the control's attention
    on the very same contexts (key control_stats)."""
    n, K = args.eval_episodes, pi.K
    envs, horizon = dt.make_eval_envs(info, n, asynchronous=False)
    horizon = min(args.eval_max_steps, horizon)
    low, high = (
        torch.as_tensor(b[0], device=device)
        for b in (envs.action_space.low, envs.action_space.high)
    )
    S, A = (
        torch.zeros(n, horizon, pi.state_dim, device=device),
        torch.zeros(n, horizon, pi.act_dim, device=device),
    )
    R = torch.zeros(n, horizon, 1, device=device)
    T = torch.arange(horizon, device=device).clamp(max=pi.max_ep_len - 1).expand(n, -1)
    target = pi.target if target is None else target
    R[:, 0] = target / pi.scale
    rewards, done, lengths = np.zeros((n, horizon)), np.zeros(n, dtype=bool), np.zeros(n, dtype=int)
    stats, cstats = RowStats(pi.n_layer, pi.n_head, K - 1), RowStats(pi.n_layer, pi.n_head, K - 1)
    obs, _ = envs.reset(seed=args.seed + 10_000)
    for t in range(horizon):
        S[:, t] = (torch.as_tensor(obs, device=device, dtype=torch.float32) - pi.mean) / pi.std
        ctx = slice(max(0, t - K + 1), t + 1)
        x = (R[:, ctx], S[:, ctx], A[:, ctx], T[:, ctx])
        act, atts = pi.attention(*x)
        k = t + 1 - ctx.start
        row, keys = (
            3 * (k - 1) + 1,
            torch.arange(3 * k, device=device),
        )  # the current state token predicts a_t
        alive = torch.as_tensor(~done, device=device)
        where = ((keys <= row)[None], keys // 3, k - 1, keys % 3 == 0)
        stats.add(t, [a[alive][:, :, row : row + 1] for a in atts], *where)
        if control is not None:
            cstats.add(t, [a[alive][:, :, row : row + 1] for a in control.attention(*x)[1]], *where)
        A[:, t] = torch.maximum(torch.minimum(act[:, -1], high), low)
        obs, r, term, trunc, _ = envs.step(A[:, t].cpu().numpy())
        rewards[:, t] = r * ~done
        lengths += ~done
        done |= term | trunc
        if done.all() or t + 1 == horizon:
            break
        R[:, t + 1] = (
            R[:, t] - torch.as_tensor(r, device=device, dtype=torch.float32)[:, None] / pi.scale
        )  # DT's rule
    envs.close()
    rhat = [(R[i, : lengths[i], 0] * pi.scale).cpu().numpy() for i in range(n)]
    togo = [np.cumsum(rewards[i, : lengths[i]][::-1])[::-1] for i in range(n)]
    visited = [(S[i, : lengths[i]] * pi.std + pi.mean).cpu().numpy() for i in range(n)]
    out = {
        "returns": rewards.sum(1),
        "lengths": lengths,
        "rhat": rhat,
        "togo": togo,
        "states": visited,
    }
    out |= {"stats": stats.summary(), "target": target}
    return out | ({"control_stats": cstats.summary()} if control is not None else {})


def tt_rollouts(
    model, disc, targs: tt.Args, info, args: Args, device, beam: bool, control=None
) -> dict:
    """tt.evaluate with a hook that records the attention of the action-predicting rows and the
    observations visited (decoded from their tokens); with `control`, also the control's attention
    on the very same inputs (key control_stats)."""
    run_args = replace(targs, beam_width=args.beam_width if beam else 1)
    shape = (len(model.blocks), model.blocks[0].attn.n_head, run_args.max_context - 1)
    stats, cstats = RowStats(*shape), RowStats(*shape)
    n_tok, m_s, m_a = (
        model.transition_dim,
        model.obs_dim,
        model.act_dim,
    )  # n_tok: tokens per transition
    visited = [[] for _ in range(run_args.eval_episodes)]

    def hook(t, prefix, act_tok, alive):
        P = prefix.shape[1]
        x = torch.cat([prefix, act_tok[:, :-1]], 1)
        keys = torch.arange(x.shape[1], device=device)
        rows = torch.arange(P - 1, P - 1 + m_a, device=device)
        allowed = (keys[None] <= rows[:, None]) & (keys % n_tok != n_tok - 1)[None]
        where = (allowed, keys // n_tok, (P - 1) // n_tok, keys % n_tok == n_tok - 2)
        for net, rec in (
            ((model, stats), (control, cstats)) if control is not None else ((model, stats),)
        ):
            atts = tt_attention(net, x)
            rec.add(t, [a[:, :, P - 1 :] for a in atts], *where)
        obs = disc.decode(prefix[:, -m_s:], slice(0, m_s)).cpu().numpy()
        for i, o in zip(alive.nonzero()[:, 0].tolist(), obs):
            visited[i].append(o)

    planner, n, max_steps = (
        tt.plan_settings(run_args),
        run_args.eval_episodes,
        run_args.eval_max_steps,
    )
    off = contextlib.nullcontext()
    res = tt.evaluate(
        model, disc, info, planner, n, max_steps, run_args.seed, device, off, hook=hook
    )
    out = {**res, "stats": stats.summary(), "states": [np.array(v) for v in visited]}
    return out | ({"control_stats": cstats.summary()} if control is not None else {})


# --------------------------------------------------------------------------------------------------
# Attention maps on dataset windows (analysis 1)
# --------------------------------------------------------------------------------------------------


def stripe_score(m: np.ndarray, far: np.ndarray) -> float:
    """Share of the far attention that the 10% most-attended key columns receive, each column's far
    weight averaged over the rows that see it."""
    col = (m * far).sum(0) / np.maximum(far.sum(0), 1)
    col = col[far.sum(0) > 0]
    top = max(1, int(round(0.1 * len(col))))
    return float(np.sort(col)[::-1][:top].sum() / max(col.sum(), 1e-12))


def map_metrics(
    maps: np.ndarray, allowed: np.ndarray, step: np.ndarray, ret: np.ndarray, kind=None
) -> dict:
    """maps (L, T, T) head-mean attention; allowed (T, T); step (T,) timestep of each token; ret
    (T,) return tokens; kind (T,) a name per token. local: mass within the same or previous timestep
    (diagonal band). stripe: stripe_score over the far attention (>= 2 steps back); vertical stripes
    -> higher. Each has its uniform reference, computed from the mask: uniform rows over the allowed
    keys (not 0.10 for the stripe score: the columns that more rows see get more of a uniform row's
    weight)."""
    d = step[:, None] - step[None, :]
    near, far = allowed & (d <= 1), allowed & (d >= 2)
    kind = np.array(["token"] * len(step)) if kind is None else np.asarray(kind)
    out = {
        "local": [],
        "stripe": [],
        "return_far_share": [],
        "far_share_by_kind": {k: [] for k in dict.fromkeys(kind)},
    }
    for m in maps:
        for k in out["far_share_by_kind"]:
            out["far_share_by_kind"][k].append(
                float((m * far * (kind == k)[None]).sum() / max((m * far).sum(), 1e-12))
            )
        out["local"].append(float((m * near).sum(1).mean()))
        out["stripe"].append(stripe_score(m, far))
        out["return_far_share"].append(
            float((m * far * ret[None]).sum() / max((m * far).sum(), 1e-12))
        )
    uniform = allowed / np.maximum(allowed.sum(1, keepdims=True), 1)
    out["local_uniform"] = float((uniform * near).sum(1).mean())
    out["stripe_uniform"] = stripe_score(uniform, far)
    out["return_share_uniform"] = float((far * ret[None]).sum() / max(far.sum(), 1))
    out["far_share_by_kind_uniform"] = {
        k: float((far * (kind == k)[None]).sum() / max(far.sum(), 1))
        for k in out["far_share_by_kind"]
    }
    return out


def head_mean(atts) -> np.ndarray:
    """Per layer, the attention averaged over windows and heads: (L, T, T)."""
    return np.stack([a.mean((0, 1)).float().cpu().numpy() for a in atts])


@torch.no_grad()
def attention_maps(
    pi: DTPolicy, tt_model, tt_disc, targs, episodes, args: Args, device, controls: tuple
) -> dict:
    """Head-mean maps of every row on the same kind of input for both: dataset windows of each
    model's training length (DT: context_len steps; TT: seq_len transitions) that lie inside one
    episode; and the random-init controls' (DT's, TT's) maps on the very same windows."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stats = (pi.mean.cpu().numpy(), pi.std.cpu().numpy())
    data = dt.make_dataset(episodes, device, pi.scale, pi.max_ep_len, state_stats=stats)
    b = dt.sample_batch(data, 8 * args.windows, pi.K, gen)
    full = b["mask"].all(1).nonzero()[:, 0][: args.windows]
    x_dt = (b["rtg"][full], b["states"][full], b["actions"][full], b["timesteps"][full])
    dt_maps, dt_c = (head_mean(p.attention(*x_dt)[1]) for p in (pi, controls[0]))
    T = 3 * pi.K
    tok = np.arange(T)
    tokens = (targs.n_bins, targs.discretizer, targs.discount, targs.terminal_penalty)
    tdata = tt.make_dataset(episodes, device, *tokens, edges=tt_disc.edges)
    x, _ = tt.sample_batch(tdata, 8 * args.windows, targs.seq_len, gen)
    x = x[(x != tt_disc.n_bins).all(1)][: args.windows]  # windows without stop tokens
    tt_maps, tt_c = (head_mean(tt_attention(m, x)) for m in (tt_model, controls[1]))
    n_tok, T2 = tt_model.transition_dim, x.shape[1]  # tokens per transition
    tok2 = np.arange(T2)
    allowed2 = np.tril(np.ones((T2, T2), bool)) & (tok2 % n_tok != n_tok - 1)[None]
    dt_where = (np.tril(np.ones((T, T), bool)), tok // 3, tok % 3 == 0, DT_KINDS[tok % 3])
    tt_where = (
        allowed2,
        tok2 // n_tok,
        tok2 % n_tok == n_tok - 2,
        tt_kinds(tt_model)[tok2 % n_tok],
    )
    return {
        "dt_maps": dt_maps,
        "tt_maps": tt_maps,
        "windows": [len(full), len(x)],
        "dt": map_metrics(dt_maps, *dt_where),
        "tt": map_metrics(tt_maps, *tt_where),
        "dt_control": map_metrics(dt_c, *dt_where),
        "tt_control": map_metrics(tt_c, *tt_where),
    }


# --------------------------------------------------------------------------------------------------
# Error propagation (analysis 6)
# --------------------------------------------------------------------------------------------------
# Our definition (the blog gives none), measured two ways. (a) On logged states: replay logged
# dataset episodes; at every step t the model predicts a_t from a context whose states and rewards
# (DT: returns-to-go) are the logged ones and whose past actions are either the logged ones
# ("teacher-forced") or the model's own earlier choices ("self-fed", what it sees when it acts). e_t
# = mean over action dimensions of (a_hat_t - a_t)^2 against the logged action, where a_hat_t is the
# model's own prediction (TT: greedy decoding); the cumulative error is E_t = sum_{t' <= t} e_t'.
# Under beam search the self-fed context holds the beam's choices, but the error is still the
# prediction's: beam search departing from the logged action on purpose is no error. Errors
# propagate when self-fed E grows beyond teacher-forced E (the only difference is the model's own
# earlier output). (b) On the policy's own rollouts, where compounding shows as drift: each visited
# state's distance from its nearest dataset state (normalised), and how it grows along the episode
# (last quarter over first quarter).


def replay_episodes(episodes, args: Args) -> list[dict]:
    long = [ep for ep in episodes if len(ep["rewards"]) >= args.error_steps]
    if not long:
        raise SystemExit(
            f"error: --error-steps {args.error_steps}: no episode of the dataset is that long."
        )
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(long), size=min(args.error_episodes, len(long)), replace=False)
    return [long[i] for i in sorted(pick)]


def stack(arrays, device) -> torch.Tensor:
    return torch.as_tensor(np.stack(arrays), dtype=torch.float32, device=device)


@torch.no_grad()
def dt_replay(pi: DTPolicy, eps, args: Args, device, self_fed: bool) -> np.ndarray:
    T, K, scale = args.error_steps, pi.K, pi.scale
    S = (stack([ep["observations"][:T] for ep in eps], device) - pi.mean) / pi.std
    A = stack([ep["actions"][:T] for ep in eps], device)
    R = stack([dt.returns_to_go(ep["rewards"])[:T, None] / scale for ep in eps], device)
    steps = torch.arange(T, device=device).clamp(max=pi.max_ep_len - 1).expand(len(eps), -1)
    A_in = A.clone() if not self_fed else torch.zeros_like(A)
    err = np.zeros((len(eps), T))
    for t in range(T):
        lo = max(0, t - K + 1)
        pred = pi(R[:, lo : t + 1], S[:, lo : t + 1], A_in[:, lo : t + 1], steps[:, lo : t + 1])[
            :, -1
        ]
        err[:, t] = ((pred - A[:, t]) ** 2).mean(-1).cpu().numpy()
        if self_fed:
            A_in[:, t] = pred
    return err


@torch.no_grad()
def tt_replay(
    model, disc, targs, eps, args: Args, device, self_fed: bool, beam: bool
) -> np.ndarray:
    """Per-step errors (episodes, steps) of TT's greedy prediction; self-fed contexts hold the
    greedy choices, or with `beam` the beam search's."""
    T, m_s, m_a = args.error_steps, model.obs_dim, model.act_dim
    greedy = tt.plan_settings(replace(targs, beam_width=1))
    steer = (
        tt.plan_settings(replace(targs, beam_width=args.beam_width)) if beam and self_fed else None
    )
    obs = disc.encode(stack([ep["observations"][:T] for ep in eps], device), slice(0, m_s))
    act_data = stack([ep["actions"][:T] for ep in eps], device)
    act = disc.encode(act_data, slice(m_s, m_s + m_a))
    rew = disc.encode(
        stack([ep["rewards"][:T, None] for ep in eps], device), slice(m_s + m_a, m_s + m_a + 1)
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    context = torch.zeros(len(eps), 0, model.transition_dim, dtype=torch.long, device=device)
    err = np.zeros((len(eps), T))
    for t in range(T):
        prefix = torch.cat([context.flatten(1), obs[:, t]], 1)
        pred = tt.plan(model, disc, prefix, greedy, gen)
        err[:, t] = (
            ((disc.decode(pred, slice(m_s, m_s + m_a)) - act_data[:, t]) ** 2)
            .mean(-1)
            .cpu()
            .numpy()
        )
        chosen = (
            (tt.plan(model, disc, prefix, steer, gen) if steer else pred) if self_fed else act[:, t]
        )
        step = torch.cat([obs[:, t], chosen, rew[:, t], torch.zeros_like(rew[:, t])], 1)
        context = torch.cat([context, step[:, None]], 1)
        context = context[
            :, context.shape[1] - min(context.shape[1], targs.max_context - 1) :
        ]  # as tt.evaluate
    return err


def growth(err: np.ndarray) -> float:
    """Mean per-step error over the last quarter of the replay divided by that over the first
    quarter."""
    q = max(1, err.shape[1] // 4)
    return float(err[:, -q:].mean() / max(err[:, :q].mean(), 1e-12))


def drift(
    visited: list, reference: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> list[np.ndarray]:
    """Per episode, each visited state's Euclidean distance from its nearest reference (dataset)
    state, both normalised by the dataset's state mean and std."""
    ref = torch.as_tensor((reference - mean) / std, dtype=torch.float32)
    out = []
    for states in visited:
        x = torch.as_tensor(
            (np.asarray(states).reshape(-1, len(mean)) - mean) / std, dtype=torch.float32
        )
        d = [torch.cdist(c, ref).min(1).values.numpy() for c in x.split(512)]
        out.append(np.concatenate(d) if d else np.zeros(0))
    return out


def log_growths(per_episode: list) -> np.ndarray:
    """log(mean of the last quarter / mean of the first quarter) of each sequence of at least 4
    steps."""
    logs = []
    for e in per_episode:
        q = len(e) // 4
        if q:
            logs.append(np.log(max(np.mean(e[-q:]), 1e-12) / max(np.mean(e[:q]), 1e-12)))
    return np.array(logs)


def log_props(self_fed: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Per replayed episode, log(E_T self-fed / E_T teacher-forced): how much the model's own
    earlier output adds to its error."""
    return np.log(np.maximum(self_fed.sum(1), 1e-12) / np.maximum(teacher.sum(1), 1e-12))


def mean_diff(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """mean(x) - mean(y) over episodes and its variance (inf with fewer than two episodes each)."""
    if len(x) < 2 or len(y) < 2:
        return (np.mean(x) - np.mean(y) if len(x) and len(y) else np.nan), np.inf
    return float(np.mean(x) - np.mean(y)), float(
        np.var(x, ddof=1) / len(x) + np.var(y, ddof=1) / len(y)
    )


def control_spread(values: list[float], variances: list[float]) -> tuple[float, float]:
    """The controls' mean and the variance of one random-init model's value: over control seeds (two
    or more), else the one control's over episodes."""
    if len(values) >= 2:
        return float(np.mean(values)), float(np.var(values, ddof=1))
    return float(values[0]), float(variances[0])


def more_than(a: np.ndarray, b: np.ndarray, controls: list[tuple]) -> tuple[str, float, float]:
    """Claim: a's per-episode log values exceed b's, beyond what the random-init control pairs (a_c,
    b_c) show. Judged on the difference of means, ours against the controls' mean (or 0), with a
    margin of the larger of log 1.2 and two standard deviations of ours minus a random-init pair's
    (episodes and control seeds). Returns the verdict and both ratios exp(diff)."""
    o, so = mean_diff(a, b)
    c, sc = control_spread(*zip(*(mean_diff(a_c, b_c) for a_c, b_c in controls)))
    spread = max(np.log(MARGIN), 2 * np.sqrt(so + sc))
    return (
        beyond_control(o, c, neutral=0.0, factor=1.0, spread=spread),
        float(np.exp(o)),
        float(np.exp(c)),
    )


# --------------------------------------------------------------------------------------------------
# Compute cost (analysis 8)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_cost(pi: DTPolicy, tt_model, disc, targs, eps, args: Args, device) -> dict:
    """Seconds of one planning call (one env step of one episode) for each K, times 1000 steps = ms
    per 1000-step episode; DT: one forward at its full context per step."""
    ep, m_s = eps[0], tt_model.obs_dim
    n_ctx = targs.max_context - 1
    joined = np.column_stack(
        [ep["observations"], ep["actions"], ep["rewards"], np.zeros(len(ep["rewards"]))]
    )
    tok = disc.encode(torch.as_tensor(joined[: n_ctx + 1], device=device))
    prefix = torch.cat([tok[:n_ctx].flatten(), tok[n_ctx, :m_s]])[None]
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def timed(fn, reps):
        """The fastest of `reps` calls (on a shared machine, the one least slowed by others), each
        ended with the device synchronized: the work, not its launch."""
        fn()  # warm-up
        times = []
        for _ in range(reps):
            tt.synchronize(device)
            t0 = time.perf_counter()
            fn()
            tt.synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    planner = tt.plan_settings(targs)
    tt_s = {
        k: timed(
            lambda k=k: tt.plan(tt_model, disc, prefix, replace(planner, beam_width=k), gen),
            args.cost_reps,
        )
        for k in args.beam_widths
    }
    k_nc = max(k for k in args.beam_widths if k <= max(8, min(args.beam_widths)))
    no_cache = timed(
        lambda: tt.plan(
            tt_model, disc, prefix, replace(planner, beam_width=k_nc, kv_cache=False), gen
        ),
        2,
    )
    K = pi.K
    x = (torch.zeros(1, K, 1, device=device), torch.zeros(1, K, pi.state_dim, device=device),
         torch.zeros(1, K, pi.act_dim, device=device),
         torch.arange(K, device=device)[None])  # fmt: skip
    dt_s = timed(lambda: pi(*x), 10 * args.cost_reps)
    ks = np.array([k for k in args.beam_widths if k >= 2], dtype=float)
    fit = {}
    if len(ks) >= 2:
        y = np.array([tt_s[int(k)] for k in ks])
        slope, icpt = np.polyfit(ks, y, 1)
        r2 = 1 - ((y - (slope * ks + icpt)) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-18)
        fit = {
            "slope_s_per_beam": float(slope),
            "intercept_s": float(icpt),
            "r2": float(r2),
            "ratio_largest_to_smallest": float(y[-1] / y[0]),
            "k_ratio": float(ks[-1] / ks[0]),
        }
    return {
        "tt_s_per_step": {str(k): v for k, v in tt_s.items()},
        "dt_s_per_step": dt_s,
        "fit_k_ge_2": fit,
        "no_kv_cache": {
            "k": k_nc,
            "s_per_step": no_cache,
            "speedup_of_cache": no_cache / tt_s[k_nc],
        },
        "horizon": targs.horizon,
        "n_expand": targs.n_expand,
        "episode_steps": 1000,
    }


def paper_speed(episodes, targs, eps, args: Args, device) -> dict:
    """TT at the paper's size (tt.Args defaults: 4 layers, 4 heads, 128 wide, batch 256, 10
    transitions): updates per second of training and seconds of one planning call with the paper's
    search (beam 128 x 2, horizon 15). The weights are random: speed does not depend on them."""
    a = tt.with_base(tt.Args(updates=1))  # the TT code's base planning settings, resolved
    data = tt.make_dataset(
        episodes, device, a.n_bins, a.discretizer, a.discount, a.terminal_penalty
    )
    ds = (episodes[0]["observations"].shape[1], episodes[0]["actions"].shape[1])
    model = tt.TrajectoryTransformer(
        *ds, a.n_bins, a.seq_len, a.n_layer, a.n_head, a.n_embd, a.dropout
    ).to(device)
    opt, _ = tt.make_optimizer(
        model, a.lr, a.lr_schedule, a.warmup_epochs * 1000, a.decay_epochs * 1000
    )
    weights, gen = (
        tt.token_weights(
            model, model.block_size, a.action_weight, a.reward_weight, a.value_weight
        ).to(device),
        torch.Generator(device=device).manual_seed(0),
    )

    def step():
        batch = tt.sample_batch(data, a.batch_size, a.seq_len, gen)
        tt.update(model, opt, batch, weights, a.grad_clip, contextlib.nullcontext())

    step()  # warm-up
    tt.synchronize(device)  # each timing ends with the device's work done, not just launched
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    tt.synchronize(device)
    ups = 3 / (time.perf_counter() - t0)
    model.eval()
    ep, m_s, n_ctx = eps[0], ds[0], a.max_context - 1
    joined = np.column_stack(
        [ep["observations"], ep["actions"], ep["rewards"], np.zeros(len(ep["rewards"]))]
    )
    tok = data["disc"].encode(torch.as_tensor(joined[: n_ctx + 1], device=device))
    prefix = torch.cat([tok[:n_ctx].flatten(), tok[n_ctx, :m_s]])[None]
    tt.synchronize(device)
    t0 = time.perf_counter()
    tt.plan(model, data["disc"], prefix, tt.plan_settings(a), gen)
    tt.synchronize(device)
    plan_s = time.perf_counter() - t0
    size = {
        "batch_size": a.batch_size,
        "n_embd": a.n_embd,
        "beam_width": a.beam_width,
        "horizon": a.horizon,
    }
    return {
        "train_updates_per_s": ups,
        "plan_s_per_step": plan_s,
        **size,
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------
# Claims, figures, main
# --------------------------------------------------------------------------------------------------


def kinds(m: dict) -> str:
    """Far-attention share of each token kind, first -> last layer (uniform share in brackets)."""
    uni = m["far_share_by_kind_uniform"]
    return "; ".join(f"{k} {fmt(v)} ({uni[k]:.2f})" for k, v in m["far_share_by_kind"].items())


def fmt(xs, d=2) -> str:
    return "[" + ", ".join(f"{x:.{d}f}" for x in xs) + "]"


def row(n: int, blog: str, ours: str, control: str, verdict: str) -> dict:
    return {"analysis": n, "blog": blog, "ours": ours, "control": control, "verdict": verdict}


def ratio(x: float, y: float) -> float:
    return x / y if y > 0 else float("nan")


def claim_1(r: dict) -> list[dict]:
    """Analysis 1, DT and TT: the maps on dataset windows, ours against the controls' on the same
    windows."""
    m, mc = r["maps"]["dt"], r["maps"]["dt_control"]
    rs, st, su = m["return_far_share"], m["stripe"], m["stripe_uniform"]
    dt_parts = [
        beyond_control(
            rs[-1], mc["return_far_share"][-1], neutral=m["return_share_uniform"]
        ),  # stripes on RTG
        beyond_control(st[-1], mc["stripe"][-1], neutral=su),  # stripes at all
        beyond_control(
            ratio(st[-1], st[0]), ratio(mc["stripe"][-1], mc["stripe"][0]), neutral=1.0
        ),  # with depth
    ]
    rows = [
        row(1, "DT: vertical stripes on return-to-go tokens, more vertical with depth",
            f"RTG share of far attention by layer {fmt(rs)} (uniform "
            f"{m['return_share_uniform']:.2f}); stripe score {fmt(st)} (uniform {su:.3f}, from the "
            f"mask); far share by token: {kinds(m)}",
            f"RTG share {fmt(mc['return_far_share'])}; stripe score {fmt(mc['stripe'])}",
            all_of(dt_parts))
    ]  # fmt: skip
    m, mc = r["maps"]["tt"], r["maps"]["tt_control"]
    st = m["stripe"]
    local = [
        beyond_control(x, xc, neutral=m["local_uniform"]) for x, xc in zip(m["local"], mc["local"])
    ]
    emerge = [
        beyond_control(st[-1], mc["stripe"][-1], neutral=m["stripe_uniform"]),
        beyond_control(ratio(st[-1], st[0]), ratio(mc["stripe"][-1], mc["stripe"][0]), neutral=1.0),
    ]
    rows.append(
        row(1, "TT: diagonal bands persist while vertical bands emerge",
            f"mass within 1 step by layer {fmt(m['local'])} (uniform {m['local_uniform']:.2f}); "
            f"stripe score {fmt(st)} (uniform {m['stripe_uniform']:.3f}); far share by token: "
            f"{kinds(m)}",
            f"mass within 1 step {fmt(mc['local'])}; stripe score {fmt(mc['stripe'])}",
            all_of(local + emerge))
    )  # fmt: skip
    return rows


def claim_2(r: dict, args: Args) -> dict:
    """Analysis 2: DT tracks its return-to-go when the returns it receives follow the conditioning.
    Judged as the slope of the return received against the target (1: every unit of target asked for
    is received), between DT's target and --track-fraction of it, beyond the controls' slope (or
    TRACKING_FLOOR) by 1.2x and two standard deviations of ours minus a random-init model's
    (episodes and control seeds); not as reaching the target."""
    t = r["rtg"]
    spread = 2 * np.sqrt(t["slope_se"] ** 2 + t["control_slope_var"])
    judged = beyond_control(t["slope"], t["control_slope"], neutral=TRACKING_FLOOR, spread=spread)
    hi, lo = t["target"], args.track_fraction * t["target"]
    ours = (
        f"return received conditioned on {hi:.0f}: {t['return_hi']:.0f}, on {lo:.0f}: "
        f"{t['return_lo']:.0f}; tracking slope {t['slope']:.3f} ± {t['slope_se']:.3f} (1 = tracks "
        "exactly). R-hat_t minus the return still to come is target - episode return, constant "
        f"along an episode under DT's rule (mean {t['gap_mean']:.0f}): no drift"
    )
    control = (
        f"{t['control_return_hi']:.0f} vs {t['control_return_lo']:.0f}: slope "
        f"{t['control_slope']:.3f}"
    )
    blog = (
        "DT: R-hat decreases toward 0 as the target is reached; R-hat tracks the rewards received"
    )
    return row(2, blog, ours, control, judged)


def relative_alloc(s: dict) -> tuple[np.ndarray, np.ndarray]:
    """Attention allocation (return / recent / old) per episode step divided by what uniform rows
    give at the same context fill (NaN where uniform gives none), and the steps."""
    alloc, uni = np.array(s["alloc"]), np.array(s["alloc_uniform_t"])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(uni > 0, alloc / uni, np.nan), np.array(s["alloc_t"])


def alloc_effects(s: dict, K: int) -> Optional[list[float]]:
    """Claim 3's three effects, each relative to uniform: RTG early / late, recent late / early, old
    in the second half of the late steps / the first half (early: t < K, the context filling)."""
    rel, ts = relative_alloc(s)
    early, late = ts < K, ts >= K
    if not early.any() or late.sum() < 10:
        return None
    half = ts[late][len(ts[late]) // 2]
    old = np.nanmean(rel[late & (ts >= half), 2]) / np.nanmean(rel[late & (ts < half), 2])
    rtg = np.nanmean(rel[early, 0]) / np.nanmean(rel[late, 0])
    return [float(rtg), float(np.nanmean(rel[late, 1]) / np.nanmean(rel[early, 1])), float(old)]


def claim_3(r: dict) -> dict:
    """Analysis 3, relative to uniform for the same context fill, ours against the control on our
    contexts."""
    blog, K = (
        "DT: RTG weighted early, then recent steps; declining attention to old steps",
        r["dt_context"],
    )
    ours, ctrl = (alloc_effects(r["dt_roll"][k], K) for k in ("stats", "control_stats"))
    if ours is None or ctrl is None:
        longest = max(r["dt_roll"]["lengths"])
        why = (
            f"episodes too short (longest {longest} steps) for a context of {K} and 10 later steps"
        )
        return row(3, blog, why, "-", UNDECIDED)
    parts = [
        beyond_control(ours[0], ctrl[0], neutral=1.0),
        beyond_control(ours[1], ctrl[1], neutral=1.0),
    ]
    parts.append(beyond_control(ours[2], ctrl[2], neutral=1.0, lower=True))

    def text(e):
        return (
            f"RTG early/late {e[0]:.2f}x, recent late/early {e[1]:.2f}x, old late-half trend "
            f"{e[2]:.2f}x"
        )

    ours_text = (
        text(ours) + f" (each share relative to uniform at its context fill; early: t < {K})"
    )
    return row(3, blog, ours_text, text(ctrl), all_of(parts))


def near(s: dict) -> float:
    """Mass within 1 step of the query, relative to uniform rows."""
    return sum(s["mass_by_distance"][:2]) / max(sum(s["uniform_by_distance"][:2]), 1e-12)


def rtg_rel(s: dict) -> float:
    """Mass on return tokens, relative to uniform rows."""
    return float(np.mean(np.array(s["alloc"])[:, 0])) / max(s["alloc_uniform"][0], 1e-12)


def claim_4(r: dict) -> dict:
    d, dc = r["dt_roll"]["stats"], r["dt_roll"]["control_stats"]
    b, bc = r["tt_beam"]["stats"], r["tt_beam"]["control_stats"]
    parts = [
        beyond_control(rtg_rel(d), rtg_rel(dc), neutral=1.0),
        beyond_control(near(b), near(bc), neutral=1.0),
    ]
    ours = (f"DT mass on RTG tokens {rtg_rel(d):.2f}x uniform, mean look-back "
            f"{d['mean_lookback_steps']:.1f} steps (uniform {d['uniform_lookback_steps']:.1f}); TT "
            f"(beam) mass within 1 step {near(b):.2f}x uniform, look-back "
            f"{b['mean_lookback_steps']:.1f} (uniform "
            f"{b['uniform_lookback_steps']:.1f})")  # fmt: skip
    control = f"DT RTG {rtg_rel(dc):.2f}x, TT within 1 step {near(bc):.2f}x"
    return row(
        4,
        "DT checks (recent) RTG values; TT focuses on the immediate past",
        ours,
        control,
        all_of(parts),
    )


def entropy_effects(dt_s: dict, tt_s: dict) -> tuple[float, float, str]:
    """How much lower TT's least-entropy head is than DT's, and how much more its heads vary
    (normalized entropies), and their summary."""
    e_dt, e_tt = np.array(dt_s["entropy_normalized"]), np.array(tt_s["entropy_normalized"])
    text = (f"DT {e_dt.min():.2f}/{e_dt.mean():.2f}/{e_dt.std():.2f} ({e_dt.size} heads), TT "
            f"{e_tt.min():.2f}/{e_tt.mean():.2f}/{e_tt.std():.2f} ({e_tt.size} heads)")  # fmt: skip
    return float(e_dt.min() - e_tt.min()), float(e_tt.std() - e_dt.std()), text


def claim_5(r: dict) -> dict:
    """Analysis 5: differences of normalized entropies, beyond the controls' by a stated 0.05 (of
    the 0-1 range: a control's heads are close to uniform, so a factor of its near-zero differences
    means nothing)."""
    (spec, var, text), (spec_c, var_c, text_c) = (
        entropy_effects(r["dt_roll"][k], r["tt_beam"][k]) for k in ("stats", "control_stats")
    )
    parts = [
        beyond_control(x, xc, neutral=0.0, factor=1.0, spread=0.05)
        for x, xc in ((spec, spec_c), (var, var_c))
    ]
    blog = "TT has more specialized (low-entropy) heads, with more variation, than DT"
    return row(
        5, blog, "normalized entropy min/mean/std over heads: " + text, text_c, all_of(parts)
    )


def claim_6(r: dict, args: Args) -> dict:
    """Analysis 6 on logged states and on the policies' own rollouts (see the definition above):
    DT's compounding over TT beam's, beyond the controls' ratio."""
    e, d = r["errors"], r["drift"]
    logged = more_than(e["log_props"]["dt"], e["log_props"]["tt_beam"], e["log_props"]["controls"])
    own = more_than(d["log_growth"]["dt"], d["log_growth"]["tt_beam"], d["log_growth"]["controls"])
    g, cum = e["growth"], e["cumulative_final"]
    prop = {
        k: cum[f"{k}_self"] / max(cum[t], 1e-12)
        for k, t in (("dt", "dt_teacher"), ("tt_greedy", "tt_teacher"))
    }
    prop["tt_beam"] = cum["tt_beam_self"] / max(cum["tt_teacher"], 1e-12)
    ours = (
        f"logged states, E_{args.error_steps} self-fed / teacher-forced: DT {prop['dt']:.2f}x, TT "
        f"greedy {prop['tt_greedy']:.2f}x, TT beam {prop['tt_beam']:.2f}x (DT/TT beam "
        f"{logged[1]:.2f}; self-fed growth last/first quarter DT {g['dt_self']:.2f}, TT beam "
        f"{g['tt_beam_self']:.2f}); own rollouts, drift from the data last/first quarter: DT "
        f"{d['growth']['dt']:.2f}x, TT beam {d['growth']['tt_beam']:.2f}x (DT/TT beam {own[1]:.2f})"
    )
    control = (f"DT/TT beam: logged {logged[2]:.2f}, own rollouts {own[2]:.2f} (drift DT "
               f"{d['growth']['dt_c']:.2f}x, TT beam {d['growth']['tt_c']:.2f}x)")  # fmt: skip
    blog = "DT's error compounds (exponential growth), TT's stays stable (beam search recovers)"
    return row(6, blog, ours, control, all_of([logged[0], own[0]]))


def claim_7(r: dict) -> dict:
    """Analysis 7: Gini difference TT - DT beyond the controls' by a stated 0.05."""
    d, b, dc, bc = (
        r["dt_roll"]["stats"],
        r["tt_beam"]["stats"],
        r["dt_roll"]["control_stats"],
        r["tt_beam"]["control_stats"],
    )
    gd, gt, gdc, gtc = (float(np.mean(s["gini"])) for s in (d, b, dc, bc))
    judged = beyond_control(gt - gd, gtc - gdc, neutral=0.0, factor=1.0, spread=0.05)
    ours = (f"Gini of the attention rows DT {gd:.2f}, TT {gt:.2f}; mean weight DT "
            f"{np.mean(d['mean_weight']):.3f}, TT {np.mean(b['mean_weight']):.3f}; variance x n^2 "
            f"DT {np.mean(d['cv2_weight']):.2f}, TT {np.mean(b['cv2_weight']):.2f}")  # fmt: skip
    return row(
        7, "TT's attention is sparser than DT's", ours, f"Gini DT {gdc:.2f}, TT {gtc:.2f}", judged
    )


def claim_8(r: dict) -> dict:
    """Analysis 8 is about compute, not the weights: no control; holds or does not hold on the
    fit."""
    f = r["cost"]["fit_k_ge_2"]
    ms = {k: 1e6 * v for k, v in r["cost"]["tt_s_per_step"].items()}
    ours = (
        f"ms per 1000-step episode: TT {', '.join(f'K={k}: {v:.0f}' for k, v in ms.items())}; DT "
        f"{1e6 * r['cost']['dt_s_per_step']:.0f}; linear fit K>=2: R^2 "
        f"{f.get('r2', float('nan')):.3f}, t(K max)/t(K min) "
        f"{f.get('ratio_largest_to_smallest', float('nan')):.1f} for K ratio "
        f"{f.get('k_ratio', float('nan')):.0f}; the KV cache saves "
        f"{r['cost']['no_kv_cache']['speedup_of_cache']:.1f}x at K={r['cost']['no_kv_cache']['k']}"
    )
    ok = f and f["r2"] >= 0.95 and f["ratio_largest_to_smallest"] >= 0.5 * f["k_ratio"]
    judged = UNDECIDED if not f else HOLDS if ok else FAILS
    blog = "TT's cost is linear in beam width K (doubling K doubles it); DT's is constant"
    return row(8, blog, ours, "- (the cost does not depend on the weights)", judged)


def claim_9(r: dict, args: Args, label: str) -> dict:
    """Analysis 9: the blog's ordering is the papers' at their budgets. Below them (r["budget"]
    lists the shortfalls) it is not decidable here; at them, TT beam above DT by two standard errors
    over episodes, each above its random-init controls (by 1.2x and two standard deviations,
    episodes and control seeds)."""
    sc, short = r["scores"], r["budget"]["shortfalls"]
    var = {
        k: sc[f"{k}_std"] ** 2 / max(sc["episodes"] - 1, 1) for k in ("dt", "tt_beam")
    }  # of the mean
    se = np.sqrt(var["dt"] + var["tt_beam"])
    learned = [
        beyond_control(
            sc[k], sc[f"{k}_control"], spread=2 * np.sqrt(var[k] + sc[f"{k}_control_var"])
        )
        for k in ("dt", "tt_beam")
    ]
    judged = all_of([*learned, beyond_control(sc["tt_beam"], sc["dt"], factor=1.0, spread=2 * se)])
    if short:
        judged = UNDECIDED
    paper = (
        f" (TT paper on official {args.env}: TT {sc['paper_tt']}, DT {sc['paper_dt']})"
        if sc["paper_tt"]
        else ""
    )
    below = f"; below the papers' budgets ({'; '.join(short)})" if short else ""
    ours = (
        f"{label} {args.env}: DT {sc['dt']:.1f}, TT greedy {sc['tt_greedy']:.1f}, TT beam "
        f"{sc['tt_beam']:.1f}{paper}"
    )
    control = f"DT {sc['dt_control']:.1f}, TT beam {sc['tt_beam_control']:.1f}"
    blog = (
        f"TT ({PUBLISHED['tt']}) scores above DT ({PUBLISHED['dt']}) (official D4RL, locomotion "
        "averages)"
    )
    return row(9, blog, ours + below, control, judged)


def make_claims(r: dict, args: Args, label: str) -> list[dict]:
    """Every claim of the blog's §7 with ours, the random-init controls' and a verdict (one of
    three)."""
    rows = claim_1(r) + [
        claim_2(r, args),
        claim_3(r),
        claim_4(r),
        claim_5(r),
        claim_6(r, args),
        claim_7(r),
    ]
    return rows + [claim_8(r), claim_9(r, args, label)]


def figures(out: Path, r: dict, args: Args, label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    attention_figures(plt, save, r, args, label)
    behaviour_figures(plt, save, r, args, label)


def attention_figures(plt, save, r: dict, args: Args, label: str):
    """Figures 1-5: the maps, R-hat, the allocation over time, the look-back and the head
    entropies."""
    maps = dict(r["maps"])
    rows = {"DT": maps["dt_maps"], "TT": maps["tt_maps"]}
    if Path(args.iem_summary).is_file():  # blog §7.b: IEM's maps beside DT's and TT's
        level, iem = next(iter(json.loads(Path(args.iem_summary).read_text())["levels"].items()))
        rows[f"IEM ({level})"] = np.asarray(iem["attention"]["layers"])
    L = max(len(m) for m in rows.values())
    fig, ax = plt.subplots(len(rows), L, figsize=(3 * L, 3 * len(rows)), squeeze=False)
    for row, (name, layers) in enumerate(rows.items()):
        for i in range(L):
            if i < len(layers):
                ax[row, i].imshow(
                    np.asarray(layers[i]) ** 0.5, cmap="viridis"
                )  # sqrt: small weights visible
                ax[row, i].set_title(f"{name} layer {i + 1}", fontsize=9)
            ax[row, i].axis("off")
    fig.suptitle(
        f"1. attention maps, head mean, sqrt scale ({label} {args.env} windows; IEM: BabyAI plans)"
    )
    save(fig, "1_attention_maps.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (rh, tg) in enumerate(zip(r["rtg"]["rhat"], r["rtg"]["togo"])):
        ax.plot(rh, color=f"C{i}", label="R-hat (conditioning)" if i == 0 else None)
        ax.plot(tg, color=f"C{i}", ls="--", label="return still to come" if i == 0 else None)
    ax.set_xlabel("episode step")
    ax.set_ylabel("return")
    ax.legend()
    ax.set_title("2. DT return-to-go tracking")
    save(fig, "2_dt_rtg_tracking.png")

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for j, (name, key) in enumerate((("DT", "dt_roll"), ("TT (beam)", "tt_beam"))):
        s = r[key]["stats"]
        ax[j].stackplot(s["alloc_t"], np.array(s["alloc"]).T, labels=s["alloc_labels"])
        ax[j].set_ylim(0, 1)
        ax[j].set_title(f"3. {name}: attention allocation")
        ax[j].set_xlabel("episode step")
    ax[1].legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8)
    save(fig, "3_attention_allocation.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for j, (name, key) in enumerate(
        (("DT", "dt_roll"), ("TT greedy", "tt_greedy"), ("TT beam", "tt_beam"))
    ):
        s = r[key]["stats"]
        ax.plot(s["mass_by_distance"], marker="o", color=f"C{j}", label=name)
        ax.plot(s["uniform_by_distance"], ls=":", color=f"C{j}")
    ax.set_xlabel("distance (timesteps back)")
    ax.set_ylabel("attention mass (dotted: uniform)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("4. how far back each model looks")
    save(fig, "4_lookback.png")

    e = {
        n: np.array(r[k]["stats"]["entropy_normalized"])
        for n, k in (("DT", "dt_roll"), ("TT", "tt_beam"))
    }
    L = max(len(v) for v in e.values())
    fig, ax = plt.subplots(1, L, figsize=(3 * L, 3), squeeze=False, sharey=True)
    for i in range(L):
        for j, (n, v) in enumerate(e.items()):
            if i < len(v):
                ax[0, i].bar(
                    np.arange(len(v[i])) + 0.4 * j, v[i], width=0.4, color=f"C{j}", label=n
                )
        ax[0, i].set_title(f"layer {i + 1}")
        ax[0, i].set_xlabel("head")
    ax[0, 0].set_ylabel("entropy / log(#keys)")
    fig.legend(*ax[0, 0].get_legend_handles_labels(), loc="upper right")
    fig.suptitle("5. head entropy (action-predicting rows)")
    save(fig, "5_head_entropy.png")


def behaviour_figures(plt, save, r: dict, args: Args, label: str):
    """Figures 6-9: error propagation, sparsity, compute cost and scores."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, err in r["errors"]["per_step"].items():
        ax.plot(np.cumsum(np.mean(err, 0)), label=name, ls="--" if "teacher" in name else "-")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cumulative action error E_t")
    ax.legend(fontsize=8)
    ax.set_title("6. error propagation (replayed dataset episodes)")
    save(fig, "6_error_propagation.png")

    names = ("Gini sparsity", "mean weight", "variance x n^2")
    keys = ("gini", "mean_weight", "cv2_weight")
    fig, ax = plt.subplots(1, 3, figsize=(9, 3))
    for i, (n, k) in enumerate(zip(names, keys)):
        ax[i].bar(
            ["DT", "TT"],
            [np.mean(r["dt_roll"]["stats"][k]), np.mean(r["tt_beam"]["stats"][k])],
            color=["C0", "C1"],
        )
        ax[i].set_title(n)
    fig.suptitle("7. attention sparsity (action-predicting rows, layer mean)")
    save(fig, "7_sparsity.png")

    c = r["cost"]
    ks = [int(k) for k in c["tt_s_per_step"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        ks,
        [1e6 * v for v in c["tt_s_per_step"].values()],
        marker="o",
        label=f"TT (horizon {c['horizon']})",
    )
    ax.axhline(1e6 * c["dt_s_per_step"], color="C1", label="DT")
    nc = c["no_kv_cache"]
    ax.plot([nc["k"]], [1e6 * nc["s_per_step"]], "x", color="C3", label="TT without KV cache")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("beam width K (K = 1: greedy decoding, no look-ahead)")
    ax.set_ylabel("ms per 1000-step episode")
    ax.legend()
    ax.set_title("8. compute cost against beam width")
    save(fig, "8_compute_cost.png")

    sc = r["scores"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = ["DT", "TT greedy", "TT beam"]
    ax.bar(names, [sc["dt"], sc["tt_greedy"], sc["tt_beam"]], color="C0", label=f"ours ({label})")
    paper = {"DT avg": PUBLISHED["dt"], "TT avg": PUBLISHED["tt"]}
    if sc["paper_dt"] is not None:
        paper.update({f"DT {args.env}": sc["paper_dt"], f"TT {args.env}": sc["paper_tt"]})
    ax.bar(
        list(paper), list(paper.values()), color="C7", label="published (TT paper, official D4RL)"
    )
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    ax.set_ylabel(f"normalized score, {args.env}")
    ax.legend(fontsize=8)
    ax.set_title("9. scores")
    save(fig, "9_scores.png")


def rollouts(m: dict, info, args: Args, device) -> dict:
    """Every evaluation: DT at its target (the control's attention on our contexts beside it) and at
    --track-fraction of it, TT greedy and beam (likewise), and each control pair's own episodes
    (same env seeds)."""
    low = args.track_fraction * m["pi"].target
    tt_args = (m["disc"], m["targs"], info, args, device)
    return {
        "dt_roll": dt_rollouts(m["pi"], info, args, device, control=m["pi_c"]),
        "dt_low": dt_rollouts(m["pi"], info, args, device, target=low),
        "dt_ctrl": [dt_rollouts(pc, info, args, device) for pc, _ in m["controls"]],
        "dt_ctrl_low": [dt_rollouts(pc, info, args, device, target=low) for pc, _ in m["controls"]],
        "tt_greedy": tt_rollouts(m["tt"], *tt_args, beam=False, control=m["tt_c"]),
        "tt_beam": tt_rollouts(m["tt"], *tt_args, beam=True, control=m["tt_c"]),
        "tt_ctrl": [tt_rollouts(tc, *tt_args, beam=True) for _, tc in m["controls"]],
    }


def slope(hi: np.ndarray, lo: np.ndarray, delta: float) -> tuple[float, float]:
    """Claim 2's tracking slope between two targets `delta` apart and its variance over episodes."""
    n = len(hi)
    var = (np.var(hi, ddof=1) + np.var(lo, ddof=1)) / n if n > 1 else np.inf
    return float((hi.mean() - lo.mean()) / delta), float(var / delta**2)


def tracking(r: dict) -> dict:
    """Claim 2's numbers: the slope of the return received against the target, ours and the
    controls' (their mean, and one random-init model's variance)."""
    d = r["dt_roll"]
    delta = d["target"] - r["dt_low"]["target"]
    k, var = slope(d["returns"], r["dt_low"]["returns"], delta)
    pairs = list(zip(r["dt_ctrl"], r["dt_ctrl_low"]))
    kc, var_c = control_spread(
        *zip(*(slope(hi["returns"], lo["returns"], delta) for hi, lo in pairs))
    )
    out = {
        "rhat": d["rhat"],
        "togo": d["togo"],
        "target": d["target"],
        "slope": k,
        "slope_se": float(np.sqrt(var)),
    }
    out |= {"control_slope": kc, "control_slope_var": var_c}
    out |= {
        "return_hi": float(d["returns"].mean()),
        "return_lo": float(r["dt_low"]["returns"].mean()),
    }
    out |= {"control_return_hi": float(np.mean([hi["returns"].mean() for hi, _ in pairs]))}
    out |= {"control_return_lo": float(np.mean([lo["returns"].mean() for _, lo in pairs]))}
    return out | {"gap_mean": float(np.mean(d["target"] - d["returns"]))}


def errors(m: dict, eps, args: Args, device) -> dict:
    """Analysis 6 on logged states, for ours and every control pair (the first's per-step errors
    kept)."""
    tt_ = (m["disc"], m["targs"], eps, args, device)
    per_step = {
        "dt_self": dt_replay(m["pi"], eps, args, device, True),
        "dt_teacher": dt_replay(m["pi"], eps, args, device, False),
        "tt_greedy_self": tt_replay(m["tt"], *tt_, True, False),
        "tt_teacher": tt_replay(m["tt"], *tt_, False, False),
        "tt_beam_self": tt_replay(m["tt"], *tt_, True, True),
    }
    controls = []
    for i, (pc, tc) in enumerate(m["controls"]):
        c = {
            "dt_c_self": dt_replay(pc, eps, args, device, True),
            "dt_c_teacher": dt_replay(pc, eps, args, device, False),
        }
        c |= {
            "tt_c_beam_self": tt_replay(tc, *tt_, True, True),
            "tt_c_teacher": tt_replay(tc, *tt_, False, False),
        }
        per_step |= c if i == 0 else {}
        controls.append(
            (
                log_props(c["dt_c_self"], c["dt_c_teacher"]),
                log_props(c["tt_c_beam_self"], c["tt_c_teacher"]),
            )
        )
    props = {"dt": log_props(per_step["dt_self"], per_step["dt_teacher"])}
    props |= {
        "tt_beam": log_props(per_step["tt_beam_self"], per_step["tt_teacher"]),
        "controls": controls,
    }
    return {
        "per_step": per_step,
        "growth": {k: growth(v) for k, v in per_step.items()},
        "cumulative_final": {k: float(v.mean(0).sum()) for k, v in per_step.items()},
        "log_props": props,
        "episodes": len(eps),
        "steps": args.error_steps,
    }


def geometric(logs: np.ndarray) -> float:
    return float(np.exp(np.mean(logs))) if len(logs) else float("nan")


def drifts(r: dict, episodes, pi: DTPolicy, seed: int) -> dict:
    """Analysis 6 on the policies' own rollouts: distance from the data along each episode, ours and
    every control pair's."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    ref = obs[
        np.random.default_rng(seed).choice(len(obs), size=min(len(obs), 20_000), replace=False)
    ]
    mean, std = pi.mean.cpu().numpy(), pi.std.cpu().numpy()

    def logs(run):
        return log_growths(drift(run["states"], ref, mean, std))

    out = {"dt": logs(r["dt_roll"]), "tt_beam": logs(r["tt_beam"])}
    out["controls"] = [(logs(d), logs(t)) for d, t in zip(r["dt_ctrl"], r["tt_ctrl"])]
    growths = {"dt": geometric(out["dt"]), "tt_beam": geometric(out["tt_beam"])}
    growths |= {"dt_c": geometric(np.concatenate([d for d, _ in out["controls"]]))}
    growths |= {"tt_c": geometric(np.concatenate([t for _, t in out["controls"]]))}
    return {"log_growth": out, "growth": growths}


def scores(r: dict, info, args: Args, label: str) -> dict:
    """Analysis 9: ours and the controls', with their spread (ours: over episodes; the controls: the
    mean over control seeds and one random-init model's variance)."""
    paper = tt.TT_PAPER_TABLE_1

    def norm(res):
        return common.normalized_score(info, np.asarray(res["returns"]))

    out = {
        k: float(norm(r[v]).mean())
        for k, v in (("dt", "dt_roll"), ("tt_greedy", "tt_greedy"), ("tt_beam", "tt_beam"))
    }
    out |= {
        f"{k}_std": float(norm(r[v]).std()) for k, v in (("dt", "dt_roll"), ("tt_beam", "tt_beam"))
    }
    for k, runs in (("dt_control", r["dt_ctrl"]), ("tt_beam_control", r["tt_ctrl"])):
        # each control seed's mean score and its variance over episodes (inf with one episode)
        per_seed = [
            (
                norm(x).mean(),
                norm(x).var(ddof=1) / len(x["returns"]) if len(x["returns"]) > 1 else np.inf,
            )
            for x in runs
        ]
        out[k], out[f"{k}_var"] = control_spread(*zip(*per_seed))
    out |= {
        "episodes": args.eval_episodes,
        "paper_dt": paper["dt"].get(args.env),
        "paper_tt": paper["tt"].get(args.env),
    }
    return out | {"published_locomotion_average": PUBLISHED, "source": label}


def budget(dt_train: dict, tt_train: dict, episodes, info) -> dict:
    """The papers' budgets (dt.py's defaults, the DT paper's; tt.py's TT-code rule for this dataset)
    and where our two models fall short of them (updates, depth, width)."""
    windows = sum(len(ep["rewards"]) - 1 for ep in episodes)
    ta, da = (
        tt.resolve_settings(tt.Args(env=info["name"]), info["name"], windows, None)[0],
        dt.Args(),
    )
    paper = {
        m: {"updates": a.updates, "n_layer": a.n_layer, "n_embd": a.n_embd}
        for m, a in (("dt", da), ("tt", ta))
    }
    short = [
        f"{m.upper()} {k} {ours[k]} < {v}"
        if k == "updates"
        else f"{m.upper()} {k} {ours[k]} != {v}"
        for m, ours in (("dt", dt_train), ("tt", tt_train))
        for k, v in paper[m].items()
        if (ours[k] < v if k == "updates" else ours[k] != v)
    ]
    return {"papers": paper, "shortfalls": short}


def analyse(m: dict, episodes, info, args: Args, device, trained: dict, clock) -> dict:
    """Every measurement behind the nine claims, ours and the random-init controls'."""
    r = {
        "maps": attention_maps(
            m["pi"], m["tt"], m["disc"], m["targs"], episodes, args, device, (m["pi_c"], m["tt_c"])
        )
    }
    r |= rollouts(m, info, args, device)
    clock("rollouts done")
    r["rtg"], r["dt_context"] = tracking(r), m["pi"].K
    eps = replay_episodes(episodes, args)
    r["errors"], r["drift"] = errors(m, eps, args, device), drifts(r, episodes, m["pi"], args.seed)
    clock("error propagation done")
    r["cost"] = compute_cost(m["pi"], m["tt"], m["disc"], m["targs"], eps, args, device)
    if args.paper_speed:
        r["cost"]["paper_size"] = paper_speed(episodes, m["targs"], eps, args, device)
    clock("compute cost done")
    label = common.SOURCE_LABEL[info["source"]]
    r["scores"], r["budget"] = (
        scores(r, info, args, label),
        budget(trained["dt"], trained["tt"], episodes, info),
    )
    return r


def lean(res: dict) -> dict:
    """A rollout's record without its per-step arrays."""
    return {k: v for k, v in res.items() if k not in ("rhat", "togo", "states")}


def write_summary(
    out: Path, r: dict, claims: list, args: Args, info, device, trained: dict, t_start
) -> dict:
    d, label = r["dt_roll"], common.SOURCE_LABEL[info["source"]]
    summary = {"config": asdict(args), "dataset": info, "data_label": label, "device": str(device)}
    summary |= {"torch": torch.__version__, "control_seed": args.control_seed}
    dt_eval = {
        "returns": d["returns"].tolist(),
        "lengths": d["lengths"].tolist(),
        "normalized_mean": r["scores"]["dt"],
    }
    summary["dt"] = {**trained["dt"], "eval": dt_eval}
    plan_s = {"greedy": r["tt_greedy"]["plan_s_per_step"], "beam": r["tt_beam"]["plan_s_per_step"]}
    summary["tt"] = {
        **trained["tt"],
        "greedy": lean(r["tt_greedy"]),
        "beam": lean(r["tt_beam"]),
        "plan_s_per_step": plan_s,
    }
    maps = {k: r["maps"][k] for k in ("dt", "tt", "dt_control", "tt_control", "windows")}
    summary["attention_maps"] = maps | {
        "dt_layers": r["maps"]["dt_maps"].tolist(),
        "tt_layers": r["maps"]["tt_maps"].tolist(),
    }
    summary["dt_rollout_attention"], summary["dt_rollout_attention_control"] = (
        d["stats"],
        d["control_stats"],
    )
    summary["rtg_tracking"] = {k: v for k, v in r["rtg"].items() if k not in ("rhat", "togo")}
    summary["error_definition"] = (
        "logged states: replayed dataset episodes; e_t = mean_dims (a_hat_t - a_t)^2 vs the "
        "logged action, a_hat_t the model's own prediction (TT: greedy); self-fed: past actions "
        "in the context are the model's own choices (TT beam: the beam's), teacher-forced: the "
        "logged ones; growth = mean e_t over the last quarter / first quarter. Own rollouts: "
        "drift = distance of each visited state from the nearest dataset state"
    )
    summary["errors"] = {k: v for k, v in r["errors"].items() if k not in ("per_step", "log_props")}
    summary["errors_mean_per_step"] = {
        k: v.mean(0).tolist() for k, v in r["errors"]["per_step"].items()
    }
    summary["drift_growth"] = r["drift"]["growth"]
    summary |= {
        "compute_cost": r["cost"],
        "scores": r["scores"],
        "budget": r["budget"],
        "claims": claims,
    }
    summary["wall_time_s"] = time.time() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def print_claims(claims: list[dict]) -> None:
    print(f"\n{'#':<2} {'blog claim':<62} | ours | random-init control | verdict")
    for c in claims:
        print(f"{c['analysis']:<2} {c['blog']:<62} | {c['ours']} | {c['control']} | {c['verdict']}")
        if c["verdict"] != HOLDS:
            print(
                f"   -> we do not confirm it ({c['verdict']}): the blog says '{c['blog']}'; we "
                "measure the above."
            )


def main(args: Args) -> dict:
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = dataset_paths(args)
    out = common.output_folder(args.out, "tt_analysis", args.force)
    try:
        episodes, info = common.load_dataset(args.env, paths)
    except common.DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    label = common.SOURCE_LABEL[info["source"]]
    pi, dt_train = get_dt(args, paths, device)
    tt_model, disc, targs, tt_train = get_tt(args, paths, device)
    controls = controls_of(pi, tt_model, targs, args, device)
    m = {"pi": pi, "tt": tt_model, "disc": disc, "targs": targs, "controls": controls}
    m["pi_c"], m["tt_c"] = controls[0]  # the attention claims' control
    print(
        f"[{time.time() - t_start:.0f} s] models ready (and their random-init controls); analysing"
    )
    trained = {"dt": dt_train, "tt": tt_train}
    r = analyse(
        m,
        episodes,
        info,
        args,
        device,
        trained,
        lambda what: print(f"[{time.time() - t_start:.0f} s] {what}"),
    )
    claims = make_claims(r, args, label)
    out.mkdir(parents=True, exist_ok=True)
    figures(out, r, args, label)
    summary = write_summary(out, r, claims, args, info, device, trained, t_start)
    print_claims(claims)
    print(f"\nscores are on {label} data ({args.env}); published numbers are official D4RL.")
    c = r["cost"]
    here = c["tt_s_per_step"].get(str(args.beam_width), float("nan"))
    print(f"TT speed here ({device}, {args.threads} thread(s)): planning {here:.3f} s per env step "
          f"of one episode at beam {args.beam_width}, horizon {args.horizon}; beam rollouts "
          f"{r['tt_beam']['plan_s_per_step']:.3f} s per step for {args.eval_episodes} episodes at "
          "once")  # fmt: skip
    if "paper_size" in c:
        ps = c["paper_size"]
        print(
            f"TT at the paper's size: {ps['train_updates_per_s']:.3f} training updates/s (batch "
            f"{ps['batch_size']}), {ps['plan_s_per_step']:.1f} s of planning per env step (beam "
            f"{ps['beam_width']}, horizon {ps['horizon']})"
        )
    print(f"figures and summary.json: {out}")
    print(f"wall time {time.time() - t_start:.0f} s")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
