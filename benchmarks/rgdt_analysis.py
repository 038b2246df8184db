"""Fig. 2.2 of the thesis (§2.3.2) and RGDT's decoder attention, from a dataset and optionally a trained rgdt.py model.

    python benchmarks/rgdt_analysis.py --env walker2d-medium --out fig2_2_walker     # the thesis's dataset
    python benchmarks/rgdt_analysis.py --checkpoint runs/RUN/model.pt --out analysis  # + that model's attention

Fig. 2.2a: the Pearson correlation of each state dimension at t and at t + k in the dataset. Fig. 2.2b-c: two
translators from the same initial weights, trained on the same batches, one with the full-context and one with the
final-token loss (Eq. 2.7's indicator 1 and 0), and the decoder self-attention of each on the same dataset segments.
With --checkpoint, also the trained model's decoder self- and cross-attention during an Alg. 2 evaluation.

Writes fig2_2.png / .json, metrics.jsonl and (with --checkpoint) attention.png / .json into --out, and prints each
statement of Fig. 2.2's caption with our measurement and a verdict. --out defaults to a new
runs/rgdt_analysis__{time}; a folder that already holds files is refused unless --force.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import rgdt  # noqa: E402


@dataclass
class Args:
    env: Optional[str] = None
    """dataset, as rgdt.py's --env. Default: the checkpoint's dataset, else hopper-medium (Fig. 2.2 is on
    walker2d-medium)"""
    dataset_path: tuple[str, ...] = ()
    """local D4RL-layout .hdf5 or decision-transformer .pkl file(s) to read instead of the official file, as rgdt.py's
    --dataset-path"""
    checkpoint: Optional[str] = None
    """a `model.pt` written by rgdt.py: its decoder attention during an evaluation is recorded too, and the two Fig.
    2.2 translators take its architecture and state normalisation (default: §2.4's architecture)"""
    out: Optional[str] = None
    """output folder (default: a new runs/rgdt_analysis__{unix time}); one that holds files only with
    --force"""
    force: bool = False
    """write into an --out that already holds files, overwriting those of the same name"""
    updates: int = 1000
    """updates of each of the two Fig. 2.2 translators; their warmup is a tenth of this, else short runs would never
    reach the learning rate"""
    batch_size: int = 256
    """segments per update of the Fig. 2.2 translators"""
    lr: float = 5e-4
    """AdamW peak learning rate of the Fig. 2.2 translators (§2.4's)"""
    eval_episodes: int = 5
    """episodes of the checkpoint's evaluation whose attention is recorded"""
    seed: int = 0
    """seed of the initial weights, the batches, the probe segments and the evaluation envs"""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`"""
    threads: int = 0
    """torch CPU threads (0: half of the cores this process may use, at least 1)"""
    log_every: int = 100
    """log the training loss of the Fig. 2.2 translators every N updates"""

    def __post_init__(self):
        rgdt.check_flags(self, "updates batch_size lr eval_episodes log_every", "seed threads")


def state_correlation(states: np.ndarray, ep_start: np.ndarray, ep_end: np.ndarray, max_offset: int) -> np.ndarray:
    """Fig. 2.2a: Pearson correlation between each state dimension at t and at t + k, over all pairs inside one
    episode, for k = 0..max_offset. Returns (max_offset + 1, m_s); NaN for a constant dimension."""
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


class AttentionRecorder:
    """Running means, per decoder layer over heads and samples, of the state-to-state self-attention map (K_s x K_s)
    and of the state-to-return cross-attention map (K_s x K_r). Called as rgdt.evaluate's `recorder(attns, alive)`."""

    def __init__(self, n_layer: int, K_s: int, K_r: int):
        self.self_maps, self.cross_maps, self.count = torch.zeros(n_layer, K_s, K_s), torch.zeros(n_layer, K_s, K_r), 0

    def __call__(self, attns: list[dict], alive: torch.Tensor) -> None:
        for i, att in enumerate(attns):
            self.self_maps[i] += att["self"][alive].float().mean(1).sum(0).cpu()
            self.cross_maps[i] += att["cross"][alive].float().mean(1).sum(0).cpu()
        self.count += int(alive.sum())

    def summary(self) -> dict:
        c = max(self.count, 1)
        self_maps, cross_maps = self.self_maps / c, self.cross_maps / c
        last = self_maps.mean(0)[-1]  # the final state's row: the one that proposes s_{t+1} at inference
        return {
            "samples": self.count,
            "self_maps": self_maps.tolist(),
            "cross_maps": cross_maps.tolist(),
            "final_row": last.tolist(),  # index K_s - 1 is the newest state, 0 the oldest
            "final_row_newest_two": float(last[-2:].sum()),
            "final_row_entropy": float(-(last * last.clamp_min(1e-12).log()).sum()),
            "uniform_entropy": math.log(len(last)),
        }


def train_two_regimes(data: dict, arch: dict, rargs: rgdt.Args, device, metrics: Path) -> dict:
    """Fig. 2.2b-c: two translators from the same initial weights, trained on the same batches, one with the
    final-token loss and one with the full-context loss; then the decoder attention of each on the same dataset
    segments (full contexts only). Fig. 2.2b's caption says "GPT model", but §2.3.2 uses the figure to argue for the
    indicator of Eq. 2.7 in RGDT's own loss, so both regimes are the RGDT translator and only the indicator differs."""
    K_r, K_s = arch["return_len"], arch["state_len"]
    torch.manual_seed(rargs.seed + 1)
    init = rgdt.DecisionTranslator(arch["state_dim"], **{k: arch[k] for k in rgdt.ARCH}).state_dict()
    valid = data["valid"]
    full = valid[(valid - data["ep_start"][valid]) >= K_s - 1]
    full = full if len(full) else valid  # every episode shorter than K_s: padded contexts it is
    probe = torch.Generator(device=device).manual_seed(rargs.seed + 2)
    probe_t = full[torch.randint(len(full), (min(512, len(full)),), generator=probe, device=device)]
    out = {}
    for name, full_context in (("final_token", False), ("full_context", True)):
        model = rgdt.DecisionTranslator(arch["state_dim"], **{k: arch[k] for k in rgdt.ARCH}).to(device)
        model.load_state_dict(init)
        opt, sched = rgdt.make_optimizer(model, rargs)
        gen = torch.Generator(device=device).manual_seed(rargs.seed + 3)
        for step in tqdm(range(rargs.updates), desc=name, mininterval=1.0):
            b = rgdt.sample_batch(data, rargs.batch_size, K_r, K_s, gen)
            mean, log_std, _ = model(b["returns"], b["states"], b["mask"])
            loss = rgdt.state_loss(mean, log_std, b["next_states"], b["mask"], full_context)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), rargs.grad_clip)
            opt.step()
            sched.step()
            if step % rargs.log_every == 0 or step + 1 == rargs.updates:
                rgdt.log_metrics(metrics, phase=f"analyze_{name}", step=step, loss=loss.item())
        recorder = AttentionRecorder(arch["n_layer"], K_s, K_r)
        b = rgdt.gather_segments(data, probe_t, K_r, K_s)
        model.eval()
        with torch.no_grad():
            _, _, attns = model(b["returns"], b["states"], b["mask"], return_attn=True)
        recorder(attns, torch.ones(len(probe_t), dtype=torch.bool, device=device))
        out[name] = recorder.summary()
    return out


def checkpoint_attention(ckpt: dict, info: dict, rargs: rgdt.Args, device) -> dict:
    """The trained model's decoder attention during an Alg. 2 evaluation, conditioned as its run was."""
    model, inv = rgdt.make_models(ckpt["arch"], device)
    model.load_state_dict(ckpt["model"])
    inv.load_state_dict(ckpt["inverse_dynamics"])
    stats = tuple(np.asarray(ckpt[k].cpu()) for k in ("state_mean", "state_std"))
    conditioning = rgdt.conditioning_returns(ckpt["best_returns"].cpu().numpy(), ckpt["args"]["target_return"])
    recorder = AttentionRecorder(len(model.decoder), model.state_len, model.return_len)
    autocast = torch.autocast(device.type, enabled=False)  # fp32: the weights themselves are the output
    res = rgdt.evaluate(model, inv, info, stats, conditioning, rargs, device, autocast, recorder=recorder)
    return {**recorder.summary(), "returns": res["returns"], "normalized_mean": res["normalized_mean"]}


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
    ax.set_yticks(range(K_s), [f"s(t-{K_s - 1 - i})" if i < K_s - 1 else "s(t)" for i in range(K_s)], fontsize=7)
    if which == "self_maps":
        ax.set_xticks(range(K_s), [f"t-{K_s - 1 - i}" if i < K_s - 1 else "t" for i in range(K_s)], fontsize=7)
        ax.set_xlabel("attended state (key)")
    else:
        ax.set_xlabel("return g(t+k), k = 1..K_r")
    ax.set_ylabel("attending state (query)")
    ax.set_title(title, fontsize=9)
    return im


def write_fig_2_2(out: Path, corr: np.ndarray, regimes: dict, title: str) -> dict:
    plt = pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    k = np.arange(len(corr))
    ax[0].plot(k, corr, color="0.8", lw=0.8)
    ax[0].plot(k, np.nanmean(corr, 1), color="k", lw=2, label="mean over state dims")
    ax[0].set_xlabel("timestep offset k")
    ax[0].set_ylabel("Pearson corr(s_t, s_{t+k})")
    ax[0].set_title("(a) correlation in the dataset", fontsize=9)
    ax[0].legend(fontsize=8)
    panels = ((ax[1], "full_context", "(b) full-context training"), (ax[2], "final_token", "(c) final-token training"))
    for a, name, label in panels:
        fig.colorbar(plot_attention(a, regimes[name], f"{label}: decoder self-attention"), ax=a)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "fig2_2.png", dpi=110)
    plt.close(fig)
    corr_json = np.where(np.isnan(corr), None, corr).tolist()
    return {"correlation_per_dim": corr_json, "correlation_mean": np.nanmean(corr, 1).tolist(), "attention": regimes}


def write_attention(out: Path, summary: dict, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    fig.colorbar(plot_attention(ax[0], summary, "decoder self-attention (states)"), ax=ax[0])
    fig.colorbar(plot_attention(ax[1], summary, "decoder cross-attention (returns)", "cross_maps"), ax=ax[1])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=110)
    plt.close(fig)
    (out / "attention.json").write_text(json.dumps(summary))


def fig_2_2_claims(fig: dict, K_s: int) -> list[dict]:
    """The two statements of Fig. 2.2's caption, each with our measurement and a verdict."""
    c = np.array(fig["correlation_mean"][: K_s + 1])
    corr_verdict = "reproduced" if np.all(np.diff(c) < 0) else ("partly" if c[-1] < c[1] else "not reproduced")
    ft, fc = fig["attention"]["final_token"], fig["attention"]["full_context"]
    nearer = fc["final_row_newest_two"] > ft["final_row_newest_two"]
    peakier = fc["final_row_entropy"] < ft["final_row_entropy"]
    att_verdict = "reproduced" if nearer and peakier else ("partly" if nearer or peakier else "not reproduced")
    corr_ours = f"mean corr at k=0..{K_s}: " + ", ".join(f"{x:.3f}" for x in c)
    att_ours = (
        f"final state's attention on newest 2 states: full-context {fc['final_row_newest_two']:.3f} vs final-token "
        f"{ft['final_row_newest_two']:.3f}; entropy {fc['final_row_entropy']:.3f} vs {ft['final_row_entropy']:.3f} "
        f"(uniform {ft['uniform_entropy']:.3f})"
    )
    att_claim = "Fig. 2.2b-c: full-context training biases attention toward nearby states; final-token is more balanced"
    return [
        {
            "claim": "Fig. 2.2a: state correlation decreases with timestep offset",
            "ours": corr_ours,
            "verdict": corr_verdict,
        },
        {"claim": att_claim, "ours": att_ours, "verdict": att_verdict},
    ]


def print_claims(claims: list[dict]) -> None:
    keys = (("thesis claim", "claim"), ("ours", "ours"), ("verdict", "verdict"))
    widths = [max(len(head), *(len(c[k]) for c in claims)) for head, k in keys]
    rows = [[head for head, _ in keys], ["-" * w for w in widths]] + [[c[k] for _, k in keys] for c in claims]
    for row in rows:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")


def main(args: Args) -> dict:
    device, _ = rgdt.setup(args)
    out = common.output_folder(args.out, "rgdt_analysis", args.force)
    ckpt = rgdt.load_checkpoint(args.checkpoint, device)
    rargs = rgdt.Args(
        env=args.env, dataset_path=args.dataset_path, checkpoint=args.checkpoint, seed=args.seed,
        batch_size=args.batch_size, lr=args.lr, updates=args.updates, warmup_steps=max(1, args.updates // 10),
        eval_episodes=args.eval_episodes, log_every=args.log_every,
    )  # fmt: skip
    episodes, info = rgdt.load_data(rargs, ckpt)
    if ckpt is not None:
        arch, stats = ckpt["arch"], tuple(np.asarray(ckpt[k].cpu()) for k in ("state_mean", "state_std"))
    else:
        arch, stats = {"state_dim": info["obs_dim"], **{k: getattr(rargs, k) for k in rgdt.ARCH}}, None  # §2.4's
    data = rgdt.make_dataset(episodes, device, arch["rtg_scale"], stats)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # --force: a new log, not the last run's extended
    label = common.SOURCE_LABEL[info["source"]]
    states, ep_start, ep_end = (data[k].cpu().numpy() for k in ("states", "ep_start", "ep_end"))
    corr = state_correlation(states, ep_start, ep_end, max(arch["return_len"], arch["state_len"]))
    regimes = train_two_regimes(data, arch, rargs, device, out / "metrics.jsonl")
    fig = write_fig_2_2(out, corr, regimes, f"Fig. 2.2-style analysis on {info['name']} ({label} data)")
    claims = fig_2_2_claims(fig, arch["state_len"])
    (out / "fig2_2.json").write_text(json.dumps({**fig, "claims": claims, "dataset": info}))
    result = {**fig, "claims": claims}
    if ckpt is not None:
        result["checkpoint_attention"] = checkpoint_attention(ckpt, info, rargs, device)
        title = f"RGDT ({args.checkpoint}) on {info['name']}: decoder attention during evaluation"
        write_attention(out, result["checkpoint_attention"], title)
    print_claims(claims)
    print(f"outputs: {out}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
