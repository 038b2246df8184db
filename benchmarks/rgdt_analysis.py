"""Fig. 2.2 of the thesis (§2.3.2), §2.4's aim (3) (the sequence-to-sequence formulation against a
decoder-only state predictor) and RGDT's decoder attention, from a dataset and optionally a trained
rgdt.py model.

    # a small budget
    python benchmarks/rgdt_analysis.py --env hopper-medium --dataset-path REPLICA/hopper-medium.hdf5
    python benchmarks/rgdt_analysis.py --env hopper-medium --dataset-path FILE --seeds 0 1 2 \
        --updates 20000
    # and a trained model's attention
    python benchmarks/rgdt_analysis.py --checkpoint runs/RUN/model.pt --out analysis

Per seed, one inverse dynamics (Eq. 2.8) and three state predictors, trained on the same batches of
the training episodes (every --held-out-every-th episode is kept out):
  gpt full-context   rgdt.py --arch gpt --full-context-loss: Fig. 2.2b's "GPT model with full
                     context prediction"
  gpt final-token    rgdt.py --arch gpt: Fig. 2.2c (the same initial weights as 2.2b: only Eq.
                     2.7's indicator differs), and the decoder-only side of aim (3)
  seq2seq            rgdt.py's translator, final-token (the thesis's RGDT): the other side of
                     aim (3)
Fig. 2.2a is the Pearson correlation of each state dimension at t and t + k in the dataset; Fig.
2.2b-c the GPT's attention from each state token to each earlier step (its return and state tokens
together) on the same dataset segments. Aim (3) compares seq2seq and decoder-only (both final-token,
so the architecture alone differs) on the normalized score of an Alg. 2 evaluation (with the seed's
inverse dynamics) and on the state-prediction NLL of s_{t+1} on the held-out episodes, and draws
both models' attention.

Every verdict follows benchmarks/attention.py's rule: beside random-init controls (rgdt's StateGPT
and DecisionTranslator constructed fresh from --control-seed, never trained; their attention on the
same segments, their NLL on the same held-out steps, their score with the same inverse dynamics and
env seeds), with a stated margin or the seed-to-seed spread; "holds", "does not hold" or "not
decidable at this budget" (aim (3) needs two or more seeds, and both models beyond their controls).
With --checkpoint, also the trained model's decoder attention during an Alg. 2 evaluation; the
predictors take its architecture and state normalisation.

Writes fig2_2.png / .json, aim3.png / .json, metrics.jsonl and (with --checkpoint) attention.png /
.json into --out, and prints "thesis claim | ours | random-init control | verdict". --out defaults
to a new runs/rgdt_analysis__{time}; a folder that already holds files is refused unless --force.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import rgdt  # noqa: E402
from attention import (  # noqa: E402
    CONTROL_SEED,
    FAILS,
    HOLDS,
    UNDECIDED,
    all_of,
    beyond_control,
    random_init,
)

# The three state predictors trained per seed: rgdt.py's --arch and Eq. 2.7's indicator (full
# context or not).
PREDICTORS = {
    "gpt_full_context": ("gpt", True),
    "gpt_final_token": ("gpt", False),
    "seq2seq": ("seq2seq", False),
}
# nats: a trained model's held-out NLL must be this far below its control's to count as learned
NLL_MARGIN = 0.1


@dataclass
class Args:
    env: Optional[str] = None
    """dataset, as rgdt.py's --env. Default: the checkpoint's dataset, else hopper-medium (Fig. 2.2
    is on walker2d-medium)"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official
    file, as rgdt.py's --dataset-path"""
    checkpoint: Optional[str] = None
    """a `model.pt` written by rgdt.py: its decoder attention during an evaluation is recorded too,
    and the three predictors take its architecture and state normalisation (default: §2.4's
    architecture)"""
    out: Optional[str] = None
    """output folder (default: a new runs/rgdt_analysis__{unix time}); one that holds files only
    with --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    resume: bool = False
    """keep each trained model in --out/models/ and reuse those already there: a stopped analysis
    continues where it stopped, and seeds run apart (one process per --seeds, the same --out and
    other flags) are combined by a last call with all of them. The flags must be those of the
    analysis in --out (its args.json)"""
    updates: int = 1000
    """updates of each state predictor; their warmup is a tenth of this, else short runs would never
    reach the learning rate"""
    inv_updates: Optional[int] = None
    """updates of each seed's inverse dynamics (§2.4's batch and optimizer), shared by its three
    predictors (default: --updates)"""
    batch_size: int = 256
    """segments per update of the state predictors"""
    lr: float = 5e-4
    """AdamW peak learning rate of the state predictors (§2.4's)"""
    seeds: tuple[int, ...] = (0,)
    """training seeds: the initial weights, the batches, the probe segments and the evaluation envs.
    Aim (3) is decided only with two or more (a seed-to-seed spread)"""
    held_out_every: int = 10
    """every N-th episode of the dataset is kept out of training; the state-prediction NLL is
    measured on those"""
    eval_episodes: int = 5
    """episodes of each Alg. 2 evaluation (each predictor, each control, and --checkpoint's)"""
    control_seed: int = CONTROL_SEED
    """seed of the random-init controls' weights (added to each training seed)"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1)"""
    log_every: int = 100
    """log the training losses every N updates"""

    def __post_init__(self):
        self.inv_updates = self.updates if self.inv_updates is None else self.inv_updates
        positive = "updates inv_updates batch_size lr eval_episodes log_every held_out_every"
        rgdt.check_flags(self, positive, "threads")
        if self.held_out_every < 2:
            every = self.held_out_every
            raise SystemExit(
                f"error: --held-out-every {every}: must be >= 2 (1 holds out everything)."
            )
        if not self.seeds or min(self.seeds) < 0:
            raise SystemExit(
                f"error: --seeds {self.seeds}: pass one or more seeds >= 0, e.g. --seeds 0 1 2."
            )

    @property
    def seed(self) -> int:  # rgdt.setup seeds the process with the first
        return self.seeds[0]


def state_correlation(
    states: np.ndarray, ep_start: np.ndarray, ep_end: np.ndarray, max_offset: int
) -> np.ndarray:
    """Fig. 2.2a: Pearson correlation between each state dimension at t and at t + k, over all pairs
    inside one episode, for k = 0..max_offset. Returns (max_offset + 1, m_s); NaN for a constant
    dimension."""
    out = np.full((max_offset + 1, states.shape[1]), np.nan)
    idx = np.arange(len(states))
    for k in range(max_offset + 1):
        t = idx[idx + k < ep_end]
        if len(t) < 2:
            break
        x, y = states[t] - states[t].mean(0), states[t + k] - states[t + k].mean(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[k] = (x * y).mean(0) / (x.std(0) * y.std(0))
    return out


def split_maps(att: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's attention, averaged over heads: state-to-state (B, T, T) and on the returns. The
    translator: its decoder self-attention and its cross-attention (B, T, K_r). The GPT: the rows of
    its state tokens s_j, each earlier step's two tokens (g_k, s_k) summed (B, T, T), and the part
    on the return tokens alone (B, T, T)."""
    if att["cross"] is not None:
        return att["self"].float().mean(1), att["cross"].float().mean(1)
    a = att["self"].float().mean(1)[:, 1::2]  # tokens g_0, s_0, g_1, s_1, ...: the state rows
    a = a.view(*a.shape[:2], -1, 2)  # keys by step: (g_k, s_k)
    return a.sum(-1), a[..., 0]


def attention_weights(attn: rgdt.Attention, x, context, allowed=None) -> torch.Tensor:
    """The weights (B, nh, T, T_ctx) an rgdt.Attention's scaled_dot_product_attention applies,
    recomputed from its inputs with its own weights: the softmax of q k^T / sqrt(d) over the keys
    `allowed` lets it see."""
    B, T, C = x.shape
    d = C // attn.n_head
    q = attn.q(x).view(B, T, attn.n_head, d).transpose(1, 2)
    k = attn.kv(context).split(C, dim=2)[0]
    k = k.view(B, context.shape[1], attn.n_head, d).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    if allowed is not None:
        att = att.masked_fill(~allowed, float("-inf"))
    return att.softmax(-1)


@contextlib.contextmanager
def captured_attention(model):
    """While inside, every forward of an rgdt.py state predictor appends to the yielded list its
    decoder layers' attention: per layer {"self": (B, nh, T, T), "cross": (B, nh, T, K_r)} for the
    translator, {"self": (B, nh, 2T, 2T) over the tokens g, s, g, s, ..., "cross": None} for the
    GPT. Forward hooks recompute the weights from each attention module's inputs (rgdt.py's model
    path has no analysis in it, issue 29); the hooks are removed on leaving."""
    layers = model.decoder if hasattr(model, "decoder") else model.blocks
    calls, current = [], [{"self": None, "cross": None} for _ in layers]

    def keep(i: int, which: str):
        def hook(module, args, output):
            with torch.no_grad():
                current[i][which] = attention_weights(module, *args).detach()

        return hook

    def forward_done(module, args, output):
        calls.append([dict(layer) for layer in current])

    handles = [model.register_forward_hook(forward_done)]
    for i, block in enumerate(layers):
        handles.append(block.self_attn.register_forward_hook(keep(i, "self")))
        if block.cross_attn is not None:
            handles.append(block.cross_attn.register_forward_hook(keep(i, "cross")))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class AttentionRecorder:
    """Running means, per layer over heads and samples, of split_maps' two maps. Called with one
    forward's attention (captured_attention) and which of its samples count."""

    def __init__(self, n_layer: int):
        self.self_maps, self.cross_maps, self.count = [0.0] * n_layer, [0.0] * n_layer, 0

    def __call__(self, attns: list[dict], alive: torch.Tensor) -> None:
        for i, att in enumerate(attns):
            s, r = split_maps(att)
            self.self_maps[i] = self.self_maps[i] + s[alive].sum(0).cpu()
            self.cross_maps[i] = self.cross_maps[i] + r[alive].sum(0).cpu()
        self.count += int(alive.sum())

    def summary(self) -> dict:
        c = max(self.count, 1)
        self_maps, cross_maps = torch.stack(self.self_maps) / c, torch.stack(self.cross_maps) / c
        # the final state's row: the one that proposes s_{t+1} at inference
        last = self_maps.mean(0)[-1]
        return {
            "samples": self.count,
            "self_maps": self_maps.tolist(),
            "cross_maps": cross_maps.tolist(),
            "final_row": last.tolist(),  # index K_s - 1 is the newest state, 0 the oldest
            "final_row_newest_two": float(last[-2:].sum()),
            "final_row_entropy": float(-(last * last.clamp_min(1e-12).log()).sum()),
            "uniform_entropy": math.log(len(last)),
        }


def split_episodes(episodes: list, every: int) -> tuple[list, list]:
    """(training, held-out): every `every`-th episode held out."""
    held = [ep for i, ep in enumerate(episodes) if i % every == every - 1]
    train = [ep for i, ep in enumerate(episodes) if i % every != every - 1]
    if not held or not any(len(ep["rewards"]) > 1 for ep in held):
        n = len(episodes)
        raise SystemExit(
            f"error: --held-out-every {every}: the dataset's {n} episodes leave none to hold out."
        )
    return train, held


def run_args(args: Args, seed: int) -> rgdt.Args:
    """rgdt.py's flags for one seed's models (§2.4's, but --updates, --lr, --batch-size and the
    warmup)."""
    return rgdt.Args(
        env=args.env, dataset_path=args.dataset_path, checkpoint=args.checkpoint, seed=seed,
        batch_size=args.batch_size, lr=args.lr, updates=args.updates,
        warmup_steps=max(1, args.updates // 10), inv_updates=args.inv_updates,
        eval_episodes=args.eval_episodes, log_every=args.log_every,
    )  # fmt: skip


def make_predictor(arch: dict, kind: str, seed: int, device) -> torch.nn.Module:
    """A state predictor of `arch` of the given --arch kind, constructed fresh from `seed`."""
    arch = {**arch, "arch": kind}
    return random_init(lambda: rgdt.make_models(arch, "cpu")[0], seed=seed).to(device)


def train_predictor(
    model, data: dict, rargs: rgdt.Args, full_context: bool, name: str, metrics: Path
):
    """Eq. 2.7 on batches drawn from the seed's generator: every predictor of one seed sees the same
    batches."""
    K_r, K_s = model.return_len, model.state_len
    opt, sched = rgdt.make_optimizer(model, rargs)
    gen = torch.Generator(device=data["states"].device).manual_seed(rargs.seed + 3)
    torch.manual_seed(rargs.seed + 3)  # its dropout, whatever was trained before it (--resume)
    model.train()
    for step in tqdm(range(rargs.updates), desc=name, mininterval=1.0, leave=False):
        batch = rgdt.sample_batch(data, rargs.batch_size, K_r, K_s, gen)
        loss, _ = rgdt.update(
            model, opt, batch, rargs.grad_clip, full_context, torch.autocast("cpu", enabled=False)
        )
        sched.step()
        if step % rargs.log_every == 0 or step + 1 == rargs.updates:
            rgdt.log_metrics(
                metrics, phase=f"analyze_{name}", seed=rargs.seed, step=step, loss=loss.item()
            )
    return model.eval()


def train_inverse(arch: dict, data: dict, rargs: rgdt.Args, metrics: Path, device):
    """The seed's inverse dynamics (Eq. 2.8), §2.4's batch and optimizer."""
    torch.manual_seed(rargs.seed)
    _, inv = rgdt.make_models(arch, device)
    opt = rgdt.make_inv_optimizer(inv, rargs.inv_lr, rargs.inv_weight_decay)
    gen = torch.Generator(device=device).manual_seed(rargs.seed + 4)
    for step in tqdm(
        range(rargs.inv_updates), desc="inverse dynamics", mininterval=1.0, leave=False
    ):
        log = step % rargs.log_every == 0 or step + 1 == rargs.inv_updates
        loss, _ = rgdt.update_inverse(
            inv, opt, rgdt.sample_transitions(data, rargs.inv_batch_size, gen), False
        )
        if log:
            rgdt.log_metrics(
                metrics, phase="analyze_inverse", seed=rargs.seed, step=step, loss=loss.item()
            )
    return inv.eval()


def probe_steps(data: dict, K_s: int, n: int, seed: int) -> torch.Tensor:
    """`n` steps whose segments have a full context of K_s states (padded ones if no episode is that
    long)."""
    valid = data["valid"]
    full = valid[(valid - data["ep_start"][valid]) >= K_s - 1]
    full = full if len(full) else valid
    gen = torch.Generator(device=valid.device).manual_seed(seed)
    return full[torch.randint(len(full), (min(n, len(full)),), generator=gen, device=valid.device)]


@torch.no_grad()
def probe_attention(model, data: dict, steps: torch.Tensor) -> dict:
    """The model's attention on the dataset segments ending at `steps`."""
    b = rgdt.gather_segments(data, steps, model.return_len, model.state_len)
    with captured_attention(model) as calls:
        model.eval()(b[model.conditioning], b["states"], b["mask"])
    attns = calls[0]
    recorder = AttentionRecorder(len(attns))
    recorder(attns, torch.ones(len(steps), dtype=torch.bool, device=steps.device))
    return recorder.summary()


@torch.no_grad()
def held_out_nll(model, held: dict, steps: torch.Tensor) -> float:
    """Eq. 2.6's NLL of s_{t+1} from the full context (the prediction Alg. 2 acts on), summed over
    the state dimensions and averaged over the held-out steps."""
    b = rgdt.gather_segments(held, steps, model.return_len, model.state_len)
    mean, log_std = model.eval()(b[model.conditioning], b["states"], b["mask"])
    last = (slice(None), slice(-1, None))
    return float(rgdt.head_loss(mean[last], log_std[last], b["next_states"][last], b["mask"][last]))


def score(
    model, inv, info: dict, data: dict, conditioning, rargs: rgdt.Args, device
) -> list[float]:
    """Alg. 2's normalized score per episode, the model as it is (fp32)."""
    settings = rgdt.EvalSettings(rargs.eval_episodes, rargs.seed, False)
    off = torch.autocast(device.type, enabled=False)
    res = rgdt.evaluate(model, inv, info, data["state_stats"], conditioning, settings, device, off)
    return list(res["normalized"])


def trained(path: Optional[Path], build, fit) -> torch.nn.Module:
    """`fit()`'s trained model; with a `path` (--resume) kept there, and read back into `build()`
    when an earlier call kept it."""
    if path is not None and path.exists():
        model = build()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = fit()
    if path is not None:  # written whole or not at all: a stop mid-save leaves no half model
        path.parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return model


def train_fresh(build, *args) -> torch.nn.Module:
    """train_predictor on a model fresh from build()."""
    return train_predictor(build(), *args)


def run_seed(seed: int, sets: dict, arch: dict, info: dict, args: Args, device, out: Path) -> dict:
    """One seed: the inverse dynamics, the three predictors and the two controls; each one's
    attention on the same probe segments, held-out NLL and score."""
    rargs, metrics = run_args(args, seed), out / "metrics.jsonl"
    data, held = sets["train"], sets["held"]

    def kept(name: str) -> Optional[Path]:  # --resume: where each trained model is kept
        return out / "models" / f"seed{seed}_{name}.pt" if args.resume else None

    def fresh_inverse() -> torch.nn.Module:
        return rgdt.make_models(arch, device)[1]

    fit = functools.partial(train_inverse, arch, data, rargs, metrics, device)
    inv = trained(kept("inverse"), fresh_inverse, fit)
    probe, held_steps = (
        probe_steps(data, arch["state_len"], 512, seed + 2),
        probe_steps(held, 1, 4096, seed + 5),
    )
    models = {}
    # the two GPTs from the same initial weights
    for name, (kind, full_context) in PREDICTORS.items():
        build = functools.partial(make_predictor, arch, kind, seed + 1, device)
        fit = functools.partial(train_fresh, build, data, rargs, full_context, name, metrics)
        models[name] = trained(kept(name), build, fit)
    c = args.control_seed + seed
    models |= {
        "gpt_control": make_predictor(arch, "gpt", c, device),
        "seq2seq_control": make_predictor(arch, "seq2seq", c, device),
    }
    res = {}
    for name, model in models.items():
        res[name] = {
            "attention": probe_attention(model, data, probe),
            "nll": held_out_nll(model, held, held_steps),
        }
        if name != "gpt_full_context":
            res[name]["scores"] = score(model, inv, info, data, sets["conditioning"], rargs, device)
    return res


def mean_attention(per_seed: list[dict], name: str) -> dict:
    """One predictor's probe attention averaged over seeds (maps and their summary numbers)."""
    runs = [s[name]["attention"] for s in per_seed]
    keys = ("self_maps", "cross_maps", "final_row", "final_row_newest_two", "final_row_entropy")
    return {**runs[0], **{k: np.mean([r[k] for r in runs], 0).tolist() for k in keys}}


def fig_2_2_claims(fig: dict, K_s: int) -> list[dict]:
    """The two statements of Fig. 2.2's caption: ours, the random-init control's and a verdict. Fig.
    2.2a is a property of the data (no model, no control): it holds if the mean correlation falls at
    every offset up to K_s. Fig. 2.2b-c: the full-context GPT puts more of its final row on the
    newest two states than both the final-token GPT and the untrained GPT (1.2x, and two standard
    errors over seeds), and the final-token GPT's row is the more balanced (entropy higher by > 0.05
    nats and two standard errors; the untrained pair of the same initial weights differs by 0)."""
    c = np.array(fig["correlation_mean"][: K_s + 1])
    corr_verdict = HOLDS if np.all(np.diff(c) < 0) else FAILS
    att = fig["attention"]
    fc, ft, ctrl = att["full_context"], att["final_token"], att["control"]
    se_near, se_ent = (
        2 * se_of(att.get("per_seed", {}).get(k, [])) for k in ("near_gap", "entropy_gap")
    )
    nearer = beyond_control(fc["final_row_newest_two"], ctrl["final_row_newest_two"],
                            neutral=ft["final_row_newest_two"], spread=se_near)  # fmt: skip
    gap = ft["final_row_entropy"] - fc["final_row_entropy"]
    balanced = beyond_control(gap, 0.0, factor=1.0, spread=max(0.05, se_ent))
    near, entropy = "final_row_newest_two", "final_row_entropy"
    att_ours = (
        f"final state's attention on the newest 2 steps: full-context GPT {fc[near]:.3f}, "
        f"final-token GPT {ft[near]:.3f}; entropy {fc[entropy]:.3f} vs "
        f"{ft[entropy]:.3f} (uniform {ft['uniform_entropy']:.3f})"
    )
    att_ctrl = f"newest 2 steps {ctrl[near]:.3f}, entropy {ctrl[entropy]:.3f}"
    att_claim = (
        "Fig. 2.2b-c: full-context training biases attention toward nearby states; final-token is "
        "more balanced"
    )
    corr_claim = "Fig. 2.2a: state correlation decreases with timestep offset"
    corr_ours = f"mean corr at k=0..{K_s}: " + ", ".join(f"{x:.3f}" for x in c)
    return [
        {
            "claim": corr_claim,
            "ours": corr_ours,
            "control": "- (a property of the data)",
            "verdict": corr_verdict,
        },
        {
            "claim": att_claim,
            "ours": att_ours,
            "control": att_ctrl,
            "verdict": all_of([nearer, balanced]),
        },
    ]


def se_of(xs) -> float:
    """Standard error of the mean over seeds (0 with fewer than two: the stated margins alone)."""
    return float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0


def aim_3_claims(aim: dict) -> list[dict]:
    """§2.4 aim (3): the seq2seq formulation's advantage over the decoder-only GPT (both
    final-token), on the score and on the held-out NLL. Decidable only when both models learned
    (held-out NLL below their random-init controls' by NLL_MARGIN) and with two or more seeds; then
    seq2seq must be better by two standard errors of the per-seed differences."""
    s, n = aim["per_seed"], len(aim["per_seed"]["seq2seq_score"])
    learned = [
        beyond_control(
            aim[f"{m}_nll"], aim[f"{m}_control_nll"], factor=1.0, spread=NLL_MARGIN, lower=True
        )
        for m in ("seq2seq", "gpt")
    ]
    why = "" if n >= 2 else " (one seed: no seed-to-seed spread)"
    if any(v != HOLDS for v in learned):
        why = (
            " (a model is not beyond its random-init control's NLL: it did not learn at this "
            "budget)"
        )
    rows = []
    for what, key, lower in (
        ("scores above", "score", False),
        ("predicts held-out states better than", "nll", True),
    ):
        diffs = np.array(s[f"seq2seq_{key}"]) - np.array(s[f"gpt_{key}"])
        judged = beyond_control(
            aim[f"seq2seq_{key}"],
            aim[f"gpt_{key}"],
            factor=1.0,
            spread=2 * se_of(diffs),
            lower=lower,
        )
        judged = UNDECIDED if why else judged
        unit = "normalized score" if key == "score" else "NLL of s_{t+1} (nats)"
        mine, theirs = aim[f"seq2seq_{key}"], aim[f"gpt_{key}"]
        ours = (
            f"{unit}: seq2seq {mine:.2f}, decoder-only {theirs:.2f} over {n} "
            f"seed(s) (per seed: {', '.join(f'{d:+.2f}' for d in diffs)}){why}"
        )
        controls = aim[f"seq2seq_control_{key}"], aim[f"gpt_control_{key}"]
        control = f"seq2seq {controls[0]:.2f}, decoder-only {controls[1]:.2f}"
        claim = f"§2.4 aim (3): the seq2seq translator {what} the decoder-only GPT (Remark 4)"
        rows.append({"claim": claim, "ours": ours, "control": control, "verdict": judged})
    return rows


def aggregate(per_seed: list[dict]) -> dict:
    """Aim (3)'s numbers: per seed and their means, for seq2seq, the final-token GPT and both
    controls."""
    names = {"seq2seq": "seq2seq", "gpt": "gpt_final_token", "seq2seq_control": "seq2seq_control"}
    names["gpt_control"] = "gpt_control"
    per = {
        f"{k}_score": [float(np.mean(s[v]["scores"])) for s in per_seed] for k, v in names.items()
    }
    per |= {f"{k}_nll": [s[v]["nll"] for s in per_seed] for k, v in names.items()}
    return {"per_seed": per, **{k: float(np.mean(v)) for k, v in per.items()}}


def figure_attention(per_seed: list[dict]) -> dict:
    """Fig. 2.2b-c's attention, averaged over seeds, with the per-seed gaps the verdict's spread
    needs."""
    regimes = {
        "full_context": "gpt_full_context",
        "final_token": "gpt_final_token",
        "control": "gpt_control",
    }
    att = {k: mean_attention(per_seed, name) for k, name in regimes.items()}

    def gap(key, a, b):
        return [s[a]["attention"][key] - s[b]["attention"][key] for s in per_seed]

    near = gap("final_row_newest_two", "gpt_full_context", "gpt_final_token")
    entropy = gap("final_row_entropy", "gpt_final_token", "gpt_full_context")
    return att | {"per_seed": {"near_gap": near, "entropy_gap": entropy}}


def checkpoint_attention(ckpt: dict, info: dict, args: Args, device) -> dict:
    """The trained model's decoder attention during an Alg. 2 evaluation, conditioned as its run
    was."""
    model, inv = rgdt.make_models(ckpt["arch"], device)
    model.load_state_dict(ckpt["model"])
    inv.load_state_dict(ckpt["inverse_dynamics"])
    stats = tuple(np.asarray(ckpt[k].cpu()) for k in ("state_mean", "state_std"))
    conditioning = rgdt.conditioning_returns(
        ckpt["best_returns"].cpu().numpy(), ckpt["args"]["target_return"]
    )
    # fp32: the weights themselves are the output
    autocast = torch.autocast(device.type, enabled=False)
    settings = rgdt.EvalSettings(args.eval_episodes, args.seeds[0], False)
    with captured_attention(model) as calls:  # one forward per env step
        res = rgdt.evaluate(model, inv, info, stats, conditioning, settings, device, autocast)
    recorder = AttentionRecorder(ckpt["arch"]["n_layer"])
    lengths = torch.as_tensor(res["lengths"], device=device)
    for t, attns in enumerate(calls[model.state_len - 1 :], model.state_len - 1):
        recorder(attns, t < lengths)  # steps with a full context of K_s states; live episodes only
    return {
        **recorder.summary(),
        "returns": res["returns"],
        "normalized_mean": res["normalized_mean"],
    }


def pyplot():
    """matplotlib, imported only when a figure is written, drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention(ax, summary: dict, title: str, which: str = "self_maps"):
    m = np.mean(summary[which], axis=0)
    im = ax.imshow(m, cmap="viridis", vmin=0, aspect="auto")
    K_s = m.shape[0]
    ax.set_yticks(
        range(K_s),
        [f"s(t-{K_s - 1 - i})" if i < K_s - 1 else "s(t)" for i in range(K_s)],
        fontsize=7,
    )
    if which == "self_maps":
        ax.set_xticks(
            range(K_s), [f"t-{K_s - 1 - i}" if i < K_s - 1 else "t" for i in range(K_s)], fontsize=7
        )
        ax.set_xlabel("attended step (key)")
    else:
        ax.set_xlabel(
            "return g(t+k), k = 1..K_r" if m.shape[1] != K_s else "return token of step (key)"
        )
    ax.set_ylabel("attending state (query)")
    ax.set_title(title, fontsize=9)
    return im


def write_fig_2_2(out: Path, corr: np.ndarray, att: dict, title: str) -> dict:
    plt = pyplot()
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    k = np.arange(len(corr))
    ax[0].plot(k, corr, color="0.8", lw=0.8)
    ax[0].plot(k, np.nanmean(corr, 1), color="k", lw=2, label="mean over state dims")
    ax[0].set_xlabel("timestep offset k")
    ax[0].set_ylabel("Pearson corr(s_t, s_{t+k})")
    ax[0].set_title("(a) correlation in the dataset", fontsize=9)
    ax[0].legend(fontsize=8)
    panels = (
        (ax[1], "full_context", "(b) GPT, full-context training"),
        (ax[2], "final_token", "(c) GPT, final-token"),
        (ax[3], "control", "random-init GPT (control)"),
    )
    for a, name, label in panels:
        fig.colorbar(plot_attention(a, att[name], label), ax=a)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "fig2_2.png", dpi=110)
    plt.close(fig)
    corr_json = np.where(np.isnan(corr), None, corr).tolist()
    return {
        "correlation_per_dim": corr_json,
        "correlation_mean": np.nanmean(corr, 1).tolist(),
        "attention": att,
    }


def write_aim_3(out: Path, per_seed: list[dict], aim: dict, title: str) -> None:
    """Aim (3)'s figure: both final-token models' attention (seed mean), their scores and held-out
    NLLs with the controls', one dot per seed."""
    plt = pyplot()
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    fig.colorbar(
        plot_attention(
            ax[0], mean_attention(per_seed, "seq2seq"), "seq2seq: decoder self-attention"
        ),
        ax=ax[0],
    )
    gpt = mean_attention(per_seed, "gpt_final_token")
    fig.colorbar(plot_attention(ax[1], gpt, "decoder-only GPT: state rows, per step"), ax=ax[1])
    names = ["seq2seq", "gpt", "seq2seq_control", "gpt_control"]
    labels = ["seq2seq", "decoder-only", "seq2seq\nrandom-init", "decoder-only\nrandom-init"]
    for a, key, ylabel in (
        (ax[2], "score", "normalized score"),
        (ax[3], "nll", "held-out NLL of s(t+1), nats"),
    ):
        a.bar(labels, [aim[f"{n}_{key}"] for n in names], color=["C0", "C1", "0.7", "0.7"])
        for i, n in enumerate(names):
            a.plot([i] * len(aim["per_seed"][f"{n}_{key}"]), aim["per_seed"][f"{n}_{key}"], "k.")
        a.set_ylabel(ylabel)
        a.tick_params(axis="x", labelsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "aim3.png", dpi=110)
    plt.close(fig)


def write_attention(out: Path, summary: dict, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    fig.colorbar(plot_attention(ax[0], summary, "decoder self-attention (states)"), ax=ax[0])
    fig.colorbar(plot_attention(ax[1], summary, "attention on the returns", "cross_maps"), ax=ax[1])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=110)
    plt.close(fig)
    (out / "attention.json").write_text(json.dumps(summary))


def print_claims(claims: list[dict]) -> None:
    keys = (
        ("thesis claim", "claim"),
        ("ours", "ours"),
        ("random-init control", "control"),
        ("verdict", "verdict"),
    )
    widths = [max(len(head), *(len(c[k]) for c in claims)) for head, k in keys]
    rows = [[head for head, _ in keys], ["-" * w for w in widths]] + [
        [c[k] for _, k in keys] for c in claims
    ]
    for row in rows:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")


def prepare(args: Args, device) -> tuple:
    """The checkpoint, dataset facts, the predictors' architecture, and the training and held-out
    data."""
    ckpt = rgdt.load_checkpoint(args.checkpoint, device)
    episodes, info = rgdt.load_data(run_args(args, args.seeds[0]), ckpt)
    if ckpt is not None:
        arch, stats = (
            ckpt["arch"],
            tuple(np.asarray(ckpt[k].cpu()) for k in ("state_mean", "state_std")),
        )
    else:  # §2.4's
        defaults = rgdt.Args()
        arch = {k: getattr(defaults, k) for k in rgdt.ARCH + rgdt.INV_ARCH}
        arch |= {"state_dim": info["obs_dim"], "act_dim": info["act_dim"]}
        stats = None
    train, held = split_episodes(episodes, args.held_out_every)
    data = rgdt.make_dataset(train, device, arch["rtg_scale"], stats)
    sets = {
        "train": data,
        "held": rgdt.make_dataset(held, device, arch["rtg_scale"], data["state_stats"]),
    }
    sets["conditioning"] = rgdt.conditioning_returns(rgdt.best_return_sequence(train), None)
    return ckpt, info, arch, sets


def output_flags(args: Args) -> dict:
    """The flags args.json keeps, which a --resume must repeat (any --seeds)."""
    flags = {k: v for k, v in asdict(args).items() if k not in ("seeds", "force", "resume")}
    return json.loads(json.dumps(flags))  # tuples as lists, as args.json holds them


def check_output(args: Args) -> Path:
    """--out, checked before any work (nothing is made yet): with --resume, the analysis it holds
    must have had these flags."""
    out = common.output_folder(args.out, "rgdt_analysis", args.force or args.resume)
    saved = out / "args.json"
    old = json.loads(saved.read_text()) if args.resume and saved.exists() else None
    if old is not None and old != output_flags(args):
        new = output_flags(args)
        differ = sorted(k for k in new.keys() | old.keys() if new.get(k) != old.get(k))
        raise SystemExit(
            f"error: --resume {out}: its analysis ran with other flags ({', '.join(differ)}); "
            "pass the same flags, or a new --out without --resume."
        )
    return out


def open_output(out: Path, args: Args) -> None:
    """--out made, with args.json. With --resume the log loses the lines of this call's seeds'
    models that models/ does not hold (a model stopped half-way trains again from its start);
    without, a new log (--force: not the last run's extended)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "metrics.jsonl"
    if args.resume and log.exists():  # other seeds' lines stay: their process may be running
        lines = [json.loads(x) for x in log.read_text().splitlines()]
        mine = [x["seed"] in args.seeds for x in lines]
        kept = [x for x, m in zip(lines, mine) if not m or (out / "models" / kept_name(x)).exists()]
        if len(kept) < len(lines):
            log.write_text("".join(json.dumps(x) + "\n" for x in kept))
    else:
        log.unlink(missing_ok=True)
    (out / "args.json").write_text(json.dumps(output_flags(args), indent=2))


def kept_name(line: dict) -> str:
    """The models/ file of the model a metrics.jsonl line logs."""
    return f"seed{line['seed']}_{line['phase'].removeprefix('analyze_')}.pt"


def main(args: Args) -> dict:
    device, _ = rgdt.setup(args)
    out = check_output(args)
    ckpt, info, arch, sets = prepare(args, device)
    open_output(out, args)
    label = common.SOURCE_LABEL[info["source"]]
    data = sets["train"]
    states, ep_start, ep_end = (data[k].cpu().numpy() for k in ("states", "ep_start", "ep_end"))
    corr = state_correlation(states, ep_start, ep_end, max(arch["return_len"], arch["state_len"]))
    per_seed = [run_seed(seed, sets, arch, info, args, device, out) for seed in args.seeds]
    fig = write_fig_2_2(
        out,
        corr,
        figure_attention(per_seed),
        f"Fig. 2.2-style analysis on {info['name']} ({label} data)",
    )
    claims = fig_2_2_claims(fig, arch["state_len"])
    aim = aggregate(per_seed)
    claims += aim_3_claims(aim)
    (out / "fig2_2.json").write_text(json.dumps({**fig, "claims": claims[:2], "dataset": info}))
    write_aim_3(
        out,
        per_seed,
        aim,
        f"§2.4 aim (3): seq2seq against decoder-only on {info['name']} ({label} data)",
    )
    aim_json = {
        **aim,
        "per_seed_models": per_seed,
        "claims": claims[2:],
        "updates": args.updates,
        "seeds": args.seeds,
    }
    (out / "aim3.json").write_text(json.dumps(aim_json))
    result = {**fig, "aim3": aim, "claims": claims}
    if ckpt is not None:
        result["checkpoint_attention"] = checkpoint_attention(ckpt, info, args, device)
        title = f"RGDT ({args.checkpoint}) on {info['name']}: decoder attention during evaluation"
        write_attention(out, result["checkpoint_attention"], title)
    print_claims(claims)
    print(f"outputs: {out}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
