"""Attention of DT, MO-DT and TRDT during evaluation (thesis §1.5.2, Fig. 1.1-1.3), from trained
checkpoints.

    python benchmarks/attention.py dt=runs/RUN_A mo_dt=runs/RUN_B trdt=runs/RUN_C --out cmp

Each argument is `method=run_folder` (or `method=path/to/model.pt`). The checkpoint is evaluated
again on its own dataset's env (10 episodes by default, all at once) while a recorder sums the
attention weights of the rows that predict actions (the s_t tokens) at every step with a full
context of K steps: per block the map over the whole context (Fig. 1.1-1.3 top), per block and head
the mass on each modality (Fig. 1.1-1.3 bottom), and per head the entropy of the rows. Writes
`{out}/{method}_{i}.png` and `.json` per model, `{out}/attention_comparison.png` (rows: models;
columns: blocks, mean mass per modality with the spread across heads; last column: head entropy) and
`attention_comparison.json`, and prints thesis claim | ours | random-init control | verdict for
§1.5.2. --out defaults to a new runs/attention__{time}; a folder that already holds files is refused
unless --force.

Every attention and behaviour verdict in benchmarks/ (here, tt_analysis, iem_analysis,
rgdt_analysis) follows one rule, `beyond_control` below: the trained model is measured beside a
random-init control (its model class constructed fresh, never trained) on the same evaluation data,
and a claim "holds" only where ours clears the control by a stated margin; it "does not hold" only
where ours falls short of the control by more than the noise margin (with no noise margin: short
of it or level with it), and is "not decidable at this budget" in between, either way. Here the
control reads the very contexts the trained policy visits.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
from claims import later_blocks_claim  # noqa: E402

MODELS = {
    "dt": "DecisionTransformer",
    "mo_dt": "MultiObjectiveDecisionTransformer",
    "trdt": "TrustRegionDecisionTransformer",
}

# --- The rule of every attention and behaviour verdict in benchmarks/ (issue 27, item 3) ---
HOLDS, FAILS, UNDECIDED = "holds", "does not hold", "not decidable at this budget"
MARGIN = 1.2  # a trained model's effect must reach this many times its random-init control's
CONTROL_SEED = (
    1000  # the weights of every random-init control (the evaluation data keep the run's seed)
)


def beyond_control(ours, control, neutral=None, factor=MARGIN, spread=0.0, lower=False) -> str:
    """One measured effect that a claim says is large (`lower`: small), against the random-init
    control of the same architecture measured the same way on the same data. The baseline is the
    control's value, or `neutral` (what no effect at all gives, e.g. uniform attention's share)
    where that is stricter; gap = ours - baseline (lower: baseline - ours), positive in the
    claim's direction; `spread` is the noise margin (an episode or seed-to-seed spread, or a
    stated difference). The rule, the same for every caller:
    - "holds": gap > spread and ours is beyond the baseline by `factor` (ours >= factor x
      baseline; lower: ours <= baseline / factor);
    - "does not hold": gap < -spread, the effect absent beyond the noise margin; with no noise
      margin (spread = 0) that is gap <= 0, ours short of the baseline or level with it;
    - "not decidable at this budget": anything else, i.e. |gap| within the noise margin either way
      (a wrong-way mean that the spread could reverse), or beyond the baseline by less than
      `factor`. The factor is a stated effect size for "large", not a noise estimate, so it only
      gates "holds"; an infinite or NaN spread never decides."""
    values = [ours, control] + ([] if neutral is None else [neutral])
    if not all(np.isfinite(v) for v in values):
        return UNDECIDED
    base = control if neutral is None else (min if lower else max)(control, neutral)
    gap = base - ours if lower else ours - base
    clears = ours * factor <= base if lower else ours >= factor * base
    if gap < -spread or (spread == 0 and gap <= 0):
        return FAILS
    return HOLDS if clears and gap > spread else UNDECIDED


def all_of(verdicts) -> str:
    """A claim of several parts: it holds when every part holds and fails when any part fails."""
    verdicts = list(verdicts)
    if FAILS in verdicts:
        return FAILS
    return HOLDS if verdicts and all(v == HOLDS for v in verdicts) else UNDECIDED


def random_init(cls, *args, seed: int = CONTROL_SEED, **kwargs) -> torch.nn.Module:
    """The control: `cls(*args, **kwargs)` constructed fresh from `seed`, never trained, in eval
    mode; the global random state is left as it was (the evaluation's own draws do not move)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(*args, **kwargs).eval()


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """`method=run_folder` (or `method=model.pt`) pairs, method one of dt, mo_dt, trdt"""
    out: Optional[str] = None
    """output folder (default: a new runs/attention__{unix time}); one that holds files only with
    --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    eval_episodes: int = 10
    """evaluation episodes per model, all at once; only steps with a full context of K steps are
    recorded"""
    device: str = "cpu"
    """device for the evaluation forwards"""
    seed: int = 0
    """seed of the evaluation envs (the method file's rule: seed + 10000 + episode)"""


class AttentionRecorder:
    """Running sums of the attention of the state-token rows (those that predict a_t), called as
    recorder(attns, alive) at every evaluation step with a full context (ActionStepAttention)."""

    def __init__(self, n_layer: int, n_head: int, K: int, modalities: tuple):
        self.modalities, self.K, self.count = list(modalities), K, 0
        M = len(modalities)
        self.rows = torch.arange(K) * M + modalities.index("states")  # the s_t tokens
        self.maps = torch.zeros(n_layer, K, M * K)
        self.mass = torch.zeros(n_layer, n_head, M)
        self.entropy = torch.zeros(n_layer, n_head)

    def __call__(self, attns: list, alive: torch.Tensor) -> None:
        M = len(self.modalities)
        for i, att in enumerate(attns):
            # (N, nh, K rows, M*K keys)
            a = att[alive][:, :, self.rows.to(att.device)].float().cpu()
            self.maps[i] += a.mean(1).sum(0)
            # per head: mass per modality
            self.mass[i] += a.view(*a.shape[:3], self.K, M).sum(3).mean(2).sum(0)
            self.entropy[i] += -(a * a.clamp_min(1e-12).log()).sum(-1).mean(-1).sum(0)
        self.count += int(alive.sum())

    def summary(self) -> dict:
        c = max(self.count, 1)
        maps, mass, ent = self.maps / c, self.mass / c, self.entropy / c
        uniform = float(np.mean([math.log(len(self.modalities) * k + 2) for k in range(self.K)]))
        return dict(
            modalities=self.modalities,
            samples=self.count,
            state_row_maps=maps.tolist(),
            modality_mass_mean=mass.mean(1).tolist(),
            modality_mass_std_across_heads=mass.std(1, unbiased=False).tolist(),
            modality_mass_per_head=mass.tolist(),
            entropy_per_head=ent.tolist(),
            entropy_uniform_reference=uniform,
        )


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_one(summary: dict, path: Path, title: str) -> None:
    """Fig. 1.1-1.3 layout: per block the map of the state rows, the mean mass per modality (error
    bars: spread across heads) and the entropy of each head."""
    plt = pyplot()
    maps, mass = np.array(summary["state_row_maps"]), np.array(summary["modality_mass_per_head"])
    ent, mods, L = (
        np.array(summary["entropy_per_head"]),
        summary["modalities"],
        len(summary["state_row_maps"]),
    )
    K, M = maps.shape[1], len(mods)
    fig, ax = plt.subplots(3, L, figsize=(3.6 * L, 9), squeeze=False)
    labels = [f"{m[0]}{k + 1}" for k in range(K) for m in mods]
    for i in range(L):
        ax[0, i].imshow(maps[i], aspect="auto", cmap="viridis")
        ax[0, i].set_title(f"block {i + 1}: state rows")
        ax[0, i].set_xticks(range(0, M * K, M), labels[::M], rotation=90, fontsize=6)
        ax[1, i].bar(mods, mass[i].mean(0), yerr=mass[i].std(0), capsize=3)
        ax[1, i].set_ylim(0, 1)
        ax[1, i].set_title("mean attention per modality")
        ax[2, i].bar(range(1, ent.shape[1] + 1), ent[i])
        ax[2, i].set_title("entropy per head (nats)")
        ax[2, i].set_xlabel("head")
    if not summary["samples"]:
        title += f" (EMPTY: every episode ended before step {K})"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_weights(attn, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head) + mask), (B, nh, T, T), of one SelfAttention of dt.py, mo_dt.py
    or trdt.py, recomputed in fp32 from the input (x, allowed) a forward hook saw, with the module's
    own weights: the method files call F.scaled_dot_product_attention, which returns none."""
    B, T, C = x.shape
    with torch.autocast(x.device.type, enabled=False):
        qkv = attn.qkv(x.float()).split(C, dim=2)
        q, k, _ = (z.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for z in qkv)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


@contextlib.contextmanager
def hooked(model, keep):
    """Forward hooks on every block's SelfAttention for the duration: `keep(i, module, inputs)`
    at each forward of block i, inputs = (x, allowed)."""
    hooks = []
    for i, block in enumerate(model.blocks):
        hook = functools.partial(lambda i, module, inputs, output: keep(i, module, inputs), i)
        hooks.append(block.attn.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def forward_attention(model, x: dict) -> tuple[dict, list]:
    """One forward of a DT-family model: its predictions and each block's attention weights."""
    attns = []
    with hooked(model, lambda i, attn, inputs: attns.append(attention_weights(attn, *inputs))):
        preds = model(x)
    return preds, attns


class WithControl(torch.nn.Module):
    """The trained model as the method file's evaluate() calls it. Every forward also runs the
    random-init control on the same inputs, the contexts the trained policy visits (the control's
    own episodes end after a few steps, before any full context)."""

    def __init__(self, model, control):
        super().__init__()
        self.model, self.control = model, control

    def __getattr__(self, name):  # K, dims, rtg_scale, bins, ...: the trained model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)

    def forward(self, x):
        self.control(x)
        return self.model(x)


class SteppedEnvs:
    """The evaluation's vector env, telling `before_step(alive)` before every step which episodes
    are still running (evaluate()'s rule: an episode is done from its first terminated or
    truncated step; its env is then reset and stepped on, unrecorded)."""

    def __init__(self, envs, before_step):
        self.envs, self.before_step, self.done = envs, before_step, None

    def __getattr__(self, name):  # action_space, close, ...: the vector env's
        return getattr(self.envs, name)

    def reset(self, **kwargs):
        obs, info = self.envs.reset(**kwargs)
        self.done = np.zeros(self.envs.num_envs, dtype=bool)
        return obs, info

    def step(self, actions):
        self.before_step(~self.done)
        obs, reward, term, trunc, info = self.envs.step(actions)
        self.done |= term | trunc
        return obs, reward, term, trunc, info


class ActionStepAttention:
    """The attention of the forwards that choose the actions in a method file's own evaluate(),
    captured from outside: the models and evaluate() have no analysis path (issue 29). Hooks keep
    each block's input at every forward; when the envs step, the newest forward is act()'s (MO-DT
    and TRDT read their return head after the step, Eq. 1.16), so its weights are recomputed and
    summed into the model's recorder over the episodes still running, at steps with a full
    context of K steps. `models` and `recorders`: name -> model, name -> AttentionRecorder."""

    def __init__(self, models: dict, recorders: dict):
        self.models, self.recorders = models, recorders
        self.inputs = {name: {} for name in models}  # name -> block -> (module, x, allowed)

    def keep(self, name: str, i: int, attn, inputs) -> None:
        self.inputs[name][i] = (attn, *inputs)

    def before_step(self, alive: np.ndarray) -> None:
        for name, rec in self.recorders.items():
            kept = [self.inputs[name][i] for i in sorted(self.inputs[name])]
            if kept and kept[0][1].shape[1] == len(rec.modalities) * rec.K:  # a full context
                attns = [attention_weights(*inputs) for inputs in kept]
                rec(attns, torch.as_tensor(alive, device=attns[0].device))

    @contextlib.contextmanager
    def during_evaluation(self, mod):
        """Within: the hooks are on, and `mod`'s evaluate() steps its envs through SteppedEnvs."""
        make_eval_envs = mod.make_eval_envs

        def stepped(*args, **kwargs):
            envs, horizon = make_eval_envs(*args, **kwargs)
            return SteppedEnvs(envs, self.before_step), horizon

        with contextlib.ExitStack() as stack:
            for name, model in self.models.items():
                stack.enter_context(hooked(model, functools.partial(self.keep, name)))
            mod.make_eval_envs = stepped
            try:
                yield self
            finally:
                mod.make_eval_envs = make_eval_envs


def measure(mod, model, control, ckpt: dict, checkpoint: str, episodes: int, dev, seed: int):
    """Evaluate `model` with the method file's own evaluate(), recording its attention and the
    control's on the same contexts. Returns (ours, control) summaries."""
    info = ckpt["dataset"]
    target = mod.TARGET_RETURNS[info["env_id"].split("-")[0].lower()]
    args = mod.Args(checkpoint=checkpoint, updates=0, eval_episodes=episodes, seed=seed)
    shape = (len(model.blocks), model.blocks[0].attn.n_head, model.K, mod.MODALITIES)
    recorders = {"ours": AttentionRecorder(*shape), "control": AttentionRecorder(*shape)}
    capture = ActionStepAttention({"ours": model, "control": control}, recorders)
    stats = (ckpt["state_mean"].cpu().numpy(), ckpt["state_std"].cpu().numpy())
    off = torch.autocast(dev.type, enabled=False)
    with capture.during_evaluation(mod):
        both = WithControl(model, control)
        res = mod.evaluate(both, info, stats, args, target, dev, off)
    ours = dict(recorders["ours"].summary(), normalized_mean=res["normalized_mean"])
    return ours, recorders["control"].summary()


def record(method: str, checkpoint: Path, episodes: int, device: str, seed: int) -> dict:
    """A checkpoint's attention during evaluation, with its random-init control's (key
    `control`)."""
    mod = importlib.import_module(method)
    dev = torch.device(device)
    ckpt = mod.load_checkpoint(str(checkpoint), dev)
    cls = getattr(mod, MODELS[method])
    model = cls(**ckpt["arch"]).to(dev)
    model.load_state_dict(ckpt["model"])
    control = random_init(cls, **ckpt["arch"]).to(dev)
    ours, ctrl = measure(mod, model, control, ckpt, str(checkpoint), episodes, dev, seed)
    if not ours["samples"]:
        print(
            f"warning: {checkpoint}: every evaluation episode ended before step K = {model.K}; "
            "nothing recorded."
        )
    return dict(ours, control=ctrl, dataset=ckpt["dataset"]["name"], checkpoint=str(checkpoint))


def later_blocks_verdict(method: str, ours: dict, control: dict) -> dict:
    """§1.5.2's "later blocks predominantly engage with action tokens" (TRDT: action regions and
    actions together), by the rule above: in every block after the first, the favoured share must
    reach MARGIN x both the control's favoured share in that block and ours on any other modality.
    """
    mods, mass = ours["modalities"], ours["modality_mass_mean"]
    row = later_blocks_claim(method, mass, mods, ours["samples"])
    favoured = ("actions", "regions") if method == "trdt" else ("actions",)

    def share(m):
        return sum(v for k, v in zip(mods, m) if k in favoured)

    row["control"] = "; ".join(
        f"block {i + 1}: {'+'.join(favoured)} {share(m):.2f}"
        for i, m in enumerate(control["modality_mass_mean"])
    )
    if not ours["samples"] or len(mass) < 2:
        return dict(row, verdict=UNDECIDED)
    parts = []
    for m, mc in zip(mass[1:], control["modality_mass_mean"][1:]):
        other = max(v for k, v in zip(mods, m) if k not in favoured)
        parts.append(beyond_control(share(m), share(mc), neutral=other))
    return dict(row, verdict=all_of(parts))


def print_table(rows: list[dict], head: str = "thesis claim") -> None:
    """claim | ours | random-init control | verdict, one line per claim."""
    print(f"{head} | ours | random-init control | verdict")
    for row in rows:
        print(f"{row['claim']} | {row['ours']} | {row.get('control', '-')} | {row['verdict']}")


def checkpoints(runs: tuple) -> list:
    """The (method, model.pt) pairs of the `method=run_folder` arguments, each checked."""
    pairs = []
    for item in runs:
        method, _, where = item.partition("=")
        if method not in MODELS or not where:
            raise SystemExit(
                f"error: {item!r}: expected method=run_folder with method one of "
                f"{', '.join(MODELS)}."
            )
        path = Path(where) / "model.pt" if Path(where).is_dir() else Path(where)
        if not path.is_file():
            raise SystemExit(
                f"error: {where}: no model.pt there; pass a run folder of {method}.py or its "
                "model.pt."
            )
        pairs.append((method, path))
    if not pairs:
        raise SystemExit(
            "error: no checkpoint given; pass method=run_folder pairs, e.g. dt=runs/RUN."
        )
    return pairs


def plot_comparison(results: dict, path: Path) -> None:
    """Rows: models; columns: blocks, mean mass per modality with the spread across heads; last
    column: head entropy per block."""
    plt = pyplot()
    L = max(len(a["modality_mass_mean"]) for a in results.values())
    fig, ax = plt.subplots(
        len(results), L + 1, figsize=(3.2 * (L + 1), 2.8 * len(results)), squeeze=False
    )
    for r, (name, a) in enumerate(results.items()):
        mean, std = np.array(a["modality_mass_mean"]), np.array(a["modality_mass_std_across_heads"])
        ent = np.array(a["entropy_per_head"])
        for b in range(L):
            if b < len(mean):
                ax[r, b].bar(a["modalities"], mean[b], yerr=std[b], capsize=3)
                ax[r, b].set_ylim(0, 1)
            ax[r, b].set_title(f"{name}: block {b + 1}" if b == 0 else f"block {b + 1}", fontsize=8)
        for h in range(ent.shape[1]):
            ax[r, L].plot(range(1, len(ent) + 1), ent[:, h], marker="o", label=f"head {h + 1}")
        ax[r, L].set_title("head entropy (nats) per block", fontsize=8)
        ax[r, L].set_xlabel("block")
    ax[0, L].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: Args) -> dict:
    pairs = checkpoints(args.runs)
    out = common.output_folder(args.out, "attention", args.force)
    names = [f"{m}_{i}" for i, (m, _) in enumerate(pairs)]
    results, claims = {}, []
    for name, (method, path) in zip(names, pairs):
        s = record(method, path, args.eval_episodes, args.device, args.seed)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(
            json.dumps({k: v for k, v in s.items() if k != "control"})
        )
        plot_one(s, out / f"{name}.png", f"{method} on {s['dataset']}: attention from state tokens")
        (out / f"{name}_control.json").write_text(json.dumps(s["control"]))
        claims.append(later_blocks_verdict(method, s, s["control"]))
        results[f"{method} ({path.parent.name})"] = s
    plot_comparison(results, out / "attention_comparison.png")
    summary = {
        name: dict(modalities=a["modalities"], modality_mass_mean=a["modality_mass_mean"],
                   samples=a["samples"],
                   modality_mass_std_across_heads=a["modality_mass_std_across_heads"],
                   mean_head_entropy_per_block=np.array(a["entropy_per_head"]).mean(1).tolist(),
                   control_modality_mass_mean=a["control"]["modality_mass_mean"])
        for name, a in results.items()
    }  # fmt: skip
    (out / "attention_comparison.json").write_text(
        json.dumps(dict(models=summary, claims=claims), indent=1)
    )
    for name, s in summary.items():
        print(name)
        blocks = zip(
            s["modality_mass_mean"],
            s["control_modality_mass_mean"],
            s["mean_head_entropy_per_block"],
        )
        for b, (m, mc, e) in enumerate(blocks):
            mass, control = (
                ", ".join(f"{k} {v:.2f}" for k, v in zip(s["modalities"], x)) for x in (m, mc)
            )
            print(
                f"  block {b + 1}: {mass}; mean head entropy {e:.2f} "
                f"(random-init control: {control})"
            )
    print_table(claims)
    print(f"wrote {out / 'attention_comparison.png'}")
    return dict(models=summary, claims=claims)


if __name__ == "__main__":
    main(tyro.cli(Args))
