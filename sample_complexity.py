"""Sample complexity of recovering the target policy with sequence modelling (thesis Chapter 4).

Companion to Chapter 4 of "Supervised Learning Methods for Offline Reinforcement Learning" (Ghanem,
2025), §4.3-4.7: Theorem 6 (Eq. 4.6), the transition point N*_min of Proposition 5 (Eq. 4.20), its
approximation in Proposition 6 (Eq. 4.21), and the synthetic experiment of §4.7 (Fig. 4.1-4.3).

The model (§4.3-4.4): discrete contexts c and actions v. A dataset mixes samples from an optimal
policy (the high-return samples) and from low-return policies. The learned model p(v|c) is the
empirical conditional frequency (the cross-entropy minimiser); the target is pi*(v|c). Theorem 6
says how many high-return samples per high-return context make E||p - pi*||_1 < epsilon.

Two readings the thesis leaves open (both are flags, both are printed):
  --beta-reading  per-context: beta_c^h = N_c^h / N_c (default), or global: beta_c^h = N_c^h / N
                  as written in §4.3. With the global reading Theorem 6 can never hold for C^h >= 2.
  --nu-reading    how "a fraction of the theoretical minimum" (§4.7) is built: fixed-beta keeps the
                  share of high-return samples per context fixed and scales the context size N_c
                  (default), or fixed-low keeps a fixed number of low-return samples per context and
                  adds high-return ones.

Run:  python sample_complexity.py         (under 10 s on 2 CPU cores; numpy only for the experiment)
      python sample_complexity.py --help  (every setting is a flag)
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np  # noqa: E402
import tyro  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402


@dataclass
class Args:
    """Reproduce the sample-complexity analysis of thesis Chapter 4 (Thm 6, Prop. 5-6,
    Fig. 4.1-4.3)."""

    eps_fig41: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5)
    """error thresholds epsilon of Fig. 4.1 (error at the theoretical minimum vs epsilon)"""
    eps_tightness: tuple[float, ...] = (0.2, 0.1)
    """epsilons of the tightness sweeps, Fig. 4.2 (0.2) and Fig. 4.3 (0.1)"""
    fractions: tuple[float, ...] = (0.1, 0.75, 1.0, 1.5, 2.0)
    """high-return sample sizes of Fig. 4.2-4.3, as fractions of the theoretical minimum"""
    n_contexts: int = 10
    """C^h, number of high-return contexts (§4.7 has |S| = 10 states; we count all of them as
    high-return)"""
    n_actions: int = 5
    """V, number of actions (§4.7: |A| = 5)"""
    opt_prob: float = 0.7
    """probability the optimal policy puts on the first action (§4.7: 0.7); the rest is spread
    evenly"""
    uniform_share: float = 0.5
    """share of the low-return samples drawn from the uniform policy; the rest come from the
    suboptimal one"""
    beta_reading: Literal["per-context", "global"] = "per-context"
    """beta_c^h = N_c^h / N_c (per-context), or N_c^h / N (global, as §4.3 writes it; Thm 6
    then has no finite minimum for C^h >= 2, and the run reports that instead of sampling)"""
    nu_reading: Literal["fixed-beta", "fixed-low"] = "fixed-beta"
    """fixed-beta: scale N_c at a fixed beta; fixed-low: add high-return samples to a fixed
    low-return count"""
    beta: float | None = None
    """fixed-beta only: share of high-return samples per context, in (0, 1]; default:
    per epsilon, the smallest share Thm 6 allows, 1 - epsilon / (4 C^h), so both halves
    of its epsilon budget are used"""
    low_samples: int | None = None
    """fixed-low only: low-return samples per high-return context; None means 100"""
    calc_n_min: tuple[float, ...] = (1e2, 1e5, 1e8)
    """calculator: N_min values (samples in the smallest high-return context) at which
    to print Eq. 4.6's two terms, the required nu_min^h and Prop. 5's regime, for every
    epsilon (beta as in the calculator table)"""
    n_seeds: int = 10
    """independent datasets per point of Fig. 4.1-4.3 (thesis: 10 seeds)"""
    slack_points: int = 40
    """points of the log-spaced fraction grid used to find where the mean error reaches epsilon"""
    slack_min_fraction: float = 1e-3
    """smallest fraction of the theoretical minimum on that grid (the largest is
    max(--fractions))"""
    slack_seeds: int = 100
    """independent datasets per grid point of the slack search"""
    seed: int = 0
    """random seed (random, numpy)"""
    out_dir: str | None = None
    """output folder; default a new runs/sample_complexity__{seed}__{unix time}; one
    that holds files only with --force"""
    force: bool = False
    """write into an --out-dir that already holds files, overwriting those of the same name"""


# --- §4.3-4.4: policies, behaviour mixture, empirical estimator -----------------------------------


def make_policies(
    n_actions: int, opt_prob: float, uniform_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """The §4.7 policies, identical in every context: returns (pi_opt, pi_low), each of shape (V,).

    §4.7 names an optimal policy (0.7 on the first action), a uniform policy and "a
    suboptimal policy" without defining the last. Our choice: the mirror of the optimal
    one (opt_prob on the LAST action). Only the optimal policy produces high-return
    samples, so pi* = pi_opt (Eq. 4.2 with alpha_k^h = 0 for the others), and the
    low-return samples come from pi_low = u * uniform + (1 - u) * suboptimal.
    """
    rest = (1.0 - opt_prob) / (n_actions - 1)
    pi_opt = np.full(n_actions, rest)
    pi_opt[0] = opt_prob
    pi_sub = pi_opt[::-1].copy()
    pi_uniform = np.full(n_actions, 1.0 / n_actions)
    pi_low = uniform_share * pi_uniform + (1.0 - uniform_share) * pi_sub
    return pi_opt, pi_low


def behaviour_policy(beta: float, pi_opt: np.ndarray, pi_low: np.ndarray) -> np.ndarray:
    """Eq. 4.1 in one context: the mixture the data are drawn from, a share beta of it optimal."""
    return beta * pi_opt + (1.0 - beta) * pi_low


def sample_estimate(rng, n_high: int, n_low: int, pi_opt, pi_low, n_contexts: int, n_datasets: int):
    """§4.4 estimator p(v|c) = (1/N_c) sum_l X_l^{c,v} on n_datasets independent datasets.

    Each context holds exactly n_high optimal and n_low low-return samples (§4.7: "controlled
    beta and N_min"). Counting a multinomial is the same as drawing the N_c samples one by
    one, and its cost does not grow with N_c, which keeps the 250,000-samples-per-context
    sweeps of epsilon = 0.1 instant. Returns an array (n_datasets, C^h, V).
    """
    counts = rng.multinomial(n_high, pi_opt, size=(n_datasets, n_contexts))
    counts = counts + rng.multinomial(n_low, pi_low, size=(n_datasets, n_contexts))
    return counts / (n_high + n_low)


# --- §4.5: the approximation error ----------------------------------------------------------------


def l1_error(p: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Eq. 4.5: sum over high-return contexts and actions of |p(v|c) - target(v|c)|, per dataset.

    p has shape (..., C^h, V); target broadcasts against it (one row per context, or one
    shared row).
    """
    return np.abs(p - target).sum(axis=(-2, -1))


# --- §4.6: Theorem 6, Proposition 5, Proposition 6 ------------------------------------------------


def check_inputs(
    eps: float, n_contexts: int, n_actions: int, beta_min: float | None = None, n_min=None
):
    """Raise ValueError, saying how to fix it, on inputs the Chapter 4 formulas cannot take."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {eps!r}")
    if not (isinstance(n_contexts, (int, np.integer)) and n_contexts >= 1):
        raise ValueError(
            f"C^h (number of high-return contexts) must be an integer >= 1, got {n_contexts!r}"
        )
    if not (isinstance(n_actions, (int, np.integer)) and n_actions >= 2):
        raise ValueError(f"V (number of actions) must be an integer >= 2, got {n_actions!r}")
    if beta_min is not None and not (0.0 <= beta_min <= 1.0):
        raise ValueError(f"beta_min is a proportion and must lie in [0, 1], got {beta_min!r}")
    if n_min is not None and not n_min >= 0:
        raise ValueError(f"N_min is a sample count and must be >= 0, got {n_min!r}")


def theorem6_terms(eps: float, n_contexts: int, n_actions: int, beta_min: float, n_min: float):
    """The two terms of the max in Eq. 4.6: (variance term, Eq. 4.13; bias term, Eq. 4.19)."""
    check_inputs(eps, n_contexts, n_actions, beta_min, n_min)
    variance_term = beta_min * (n_contexts * n_actions / eps) ** 2
    bias_term = n_min * (1.0 - eps / (4.0 * n_contexts))
    return variance_term, bias_term


def theorem6_holds(
    eps: float, n_contexts: int, n_actions: int, beta_min: float, n_min: float
) -> bool:
    """Thm 6's condition nu_min^h >= max{...} (Eq. 4.6), with nu_min^h = beta_min^h N_min (§4.5)"""
    nu = beta_min * n_min
    return nu >= max(theorem6_terms(eps, n_contexts, n_actions, beta_min, n_min)) * (1.0 - 1e-12)


def transition_point(eps: float, n_contexts: int, n_actions: int, beta_min: float) -> float:
    """Eq. 4.20: the N_min at which the two terms of Eq. 4.6 are equal (Prop. 5)."""
    check_inputs(eps, n_contexts, n_actions, beta_min)
    c = n_contexts
    return 4.0 * beta_min * c**3 * n_actions**2 / (eps**2 * (4.0 * c - eps))


def transition_point_approx(eps: float, n_contexts: int, n_actions: int, beta_min: float) -> float:
    """Eq. 4.21 (Prop. 6): first-order expansion of Eq. 4.20 in eps / (4 C^h).

    Its relative error is exactly (eps / (4 C^h))^2, since (1 + x)(1 - x) = 1 - x^2 with
    x = eps/(4 C^h).
    """
    check_inputs(eps, n_contexts, n_actions, beta_min)
    c = n_contexts
    return beta_min * c**2 * n_actions**2 / eps**2 + beta_min * c * n_actions**2 / (4.0 * eps)


def regime(n_min: float, n_star: float, margin: float = 10.0) -> str:
    """Prop. 5's regimes. The thesis says "N_min << N*" without a number; we read << as a factor
    `margin`."""
    if n_min <= n_star / margin:
        return "small-data"
    if n_min >= n_star * margin:
        return "large-data"
    return "transition"


def min_high_samples(
    eps, n_contexts, n_actions, nu_reading, beta_reading, beta=None, n_low=None
) -> float:
    """Smallest number of high-return samples per context for which Eq. 4.6 holds
    (math.inf if none).

    Substituting nu = beta N_min into Eq. 4.6 splits it into two conditions:
      variance (Eq. 4.13): N_min >= (C^h V / eps)^2;   bias (Eq. 4.19): beta >= 1 - eps / (4 C^h).
    fixed-beta: beta is fixed, so the minimum is beta * (C^h V / eps)^2 if the bias condition holds.
    fixed-low:  N_c = n_high + n_low and beta = n_high / N_c grow together; solving both conditions
                for n_high gives max{(C^h V / eps)^2 - n_low, n_low (4 C^h / eps - 1)}.
    global beta (beta_c^h = N_c^h / N): the shares of the C^h contexts sum to at most 1, so
    beta_min <= 1 / C^h < 1 - eps / (4 C^h) whenever C^h >= 2 and eps < 2 C^h (checked by the
    caller): no sample size satisfies Thm 6. With C^h = 1 both readings coincide.
    """
    check_inputs(eps, n_contexts, n_actions)
    if beta_reading == "global" and n_contexts >= 2:
        return math.inf
    n_var = (n_contexts * n_actions / eps) ** 2
    if nu_reading == "fixed-beta":
        return (
            beta * n_var if beta >= (1.0 - eps / (4.0 * n_contexts)) * (1.0 - 1e-12) else math.inf
        )
    return max(n_var - n_low, n_low * (4.0 * n_contexts / eps - 1.0), 0.0)


# --- §4.7: the synthetic experiment ---------------------------------------------------------------


def design(fraction: float, eps: float, args: Args) -> tuple[int, int]:
    """(high-return, low-return) samples per context at `fraction` of the theoretical
    minimum (§4.7).

    Counts are rounded up so that at fraction 1 the dataset satisfies Eq. 4.6 (tested).
    """
    c, v = args.n_contexts, args.n_actions
    if args.nu_reading == "fixed-beta":
        beta = beta_for(eps, args)
        n_total = math.ceil(fraction * (c * v / eps) ** 2 - 1e-9)
        n_high = math.ceil(beta * n_total - 1e-9)
        return n_high, n_total - n_high
    nu = min_high_samples(eps, c, v, "fixed-low", args.beta_reading, n_low=args.low_samples)
    return math.ceil(fraction * nu - 1e-9), args.low_samples


def beta_for(eps: float, args: Args) -> float:
    """Share of high-return samples per context in the fixed-beta reading (see --beta)."""
    return args.beta if args.beta is not None else 1.0 - eps / (4.0 * args.n_contexts)


def required_high(eps: float, args: Args) -> float:
    """The theoretical minimum nu_min^h (high-return samples per context) under the readings."""
    return min_high_samples(
        eps,
        args.n_contexts,
        args.n_actions,
        args.nu_reading,
        args.beta_reading,
        beta_for(eps, args),
        args.low_samples,
    )


def run_point(
    rng, fraction: float, eps: float, args: Args, n_datasets: int, pi_opt, pi_low
) -> dict:
    """Error of p at one sample size: Eq. 4.5 against pi*, and the proof's two terms (Eq. 4.8)."""
    n_high, n_low = design(fraction, eps, args)
    p = sample_estimate(rng, n_high, n_low, pi_opt, pi_low, args.n_contexts, n_datasets)
    beta = n_high / (n_high + n_low)
    pi = behaviour_policy(beta, pi_opt, pi_low)
    err = l1_error(p, pi_opt)
    # ||E p - pi*||_1, Eq. 4.14
    return dict(
        fraction=fraction,
        n_high=n_high,
        n_low=n_low,
        beta=beta,
        errors=err.tolist(),
        mean=float(err.mean()),
        std=float(err.std(ddof=1)) if n_datasets > 1 else 0.0,
        variance_term=float(l1_error(p, pi).mean()),  # E||p - E p||_1, Eq. 4.9
        bias_term=float(args.n_contexts * np.abs(pi - pi_opt).sum()),
    )


def slack_fraction(fractions, means, eps: float) -> tuple[float, str]:
    """Fraction of the theoretical minimum at which the mean error falls to eps (log-log
    interpolation).

    The error decreases with the sample size; we take the last grid point still above eps and
    interpolate to the next. Returns (fraction, note) where note flags a crossing outside the grid.
    """
    fractions, means = np.asarray(fractions, float), np.asarray(means, float)
    above = np.nonzero(means > eps)[0]
    if len(above) == 0:
        note = f"error below epsilon on the whole grid: slack < {fractions[0]:g}"
        return float(fractions[0]), note
    i = above[-1]
    if i == len(fractions) - 1:
        note = f"error above epsilon on the whole grid: slack > {fractions[-1]:g}"
        return float(fractions[-1]), note
    lf, le = np.log(fractions[i : i + 2]), np.log(means[i : i + 2])
    t = (np.log(eps) - le[0]) / (le[1] - le[0])
    return float(np.exp(lf[0] + t * (lf[1] - lf[0]))), "interpolated"


def sweep(
    rng, eps: float, fractions, args: Args, n_datasets: int, pi_opt, pi_low
) -> list[dict] | None:
    """run_point over fractions of the minimum; None when Thm 6 gives no finite minimum at eps."""
    if not math.isfinite(required_high(eps, args)):
        return None
    return [run_point(rng, f, eps, args, n_datasets, pi_opt, pi_low) for f in fractions]


# --- claims and figures: thesis claim | our measurement | verdict ---------------------------------
# Each claim's check is one function that returns its row, beside the figure it reads; claims_table
# (below) lists them in the printed order.

NO_MINIMUM = "no finite minimum under this reading"


def verdict(n_ok: int, n_total: int) -> str:
    return "reproduced" if n_ok == n_total else ("not reproduced" if n_ok == 0 else "partly")


def at(points: list[dict] | None, fraction: float) -> dict | None:
    return None if points is None else next(p for p in points if p["fraction"] == fraction)


def pyplot():
    """matplotlib, imported when a figure is drawn (not when this file is imported), with a
    file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Fig. 4.1: Thm 6 at the theoretical minimum, and the two halves of its proof there.


def claim_thm6_at_minimum(sweeps: dict) -> dict:
    """Thm 6 as Fig. 4.1 tests it (and the 1.0x points of Fig. 4.2-4.3): E||p - pi*||_1 < eps at
    the minimum."""
    ok = [e for e, pts in sweeps.items() if pts and at(pts, 1.0)["mean"] < e]

    def one(e, p):
        q = at(p, 1.0)
        n_below = sum(x < e for x in q["errors"])
        return (
            f"eps={e:g}: {q['mean']:.3f}+-{q['std']:.3f} ({n_below}/{len(q['errors'])} seeds < eps)"
        )

    ours = "; ".join(one(e, p) if p else f"eps={e:g}: {NO_MINIMUM}" for e, p in sweeps.items())
    return dict(
        claim="Thm 6 / Fig. 4.1-4.3: at the theoretical minimum E||p-pi*||_1 < eps",
        ours="mean+-std " + ours,
        verdict=verdict(len(ok), len(sweeps)),
    )


def claim_proof_halves(sweeps: dict) -> dict:
    """Proof of Thm 6: each half of the budget, Eq. 4.12 (variance <= eps/2) and Eq. 4.18
    (bias <= eps/2)."""
    parts = [(e, at(p, 1.0)) for e, p in sweeps.items() if p]
    ok = sum(q["variance_term"] <= e / 2 and q["bias_term"] <= e / 2 + 1e-12 for e, q in parts)
    ours = (
        "; ".join(
            f"eps={e:g}: variance {q['variance_term'] / (e / 2):.2f}, bias "
            f"{q['bias_term'] / (e / 2):.2f}"
            for e, q in parts
        )
        or NO_MINIMUM
    )
    return dict(
        claim="Eq. 4.12 and 4.18: at the minimum, variance term <= eps/2 and bias term <= eps/2",
        ours="as fractions of eps/2: " + ours,
        verdict=verdict(ok, len(sweeps)),
    )


def plot_fig41(fig41: dict, path: str) -> None:
    """Fig. 4.1: error at the theoretical minimum next to its threshold, per epsilon."""
    plt = pyplot()
    eps = [e for e, p in fig41.items() if p]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    x = np.arange(len(eps))
    ax.bar(
        x - 0.2,
        [at(fig41[e], 1.0)["mean"] for e in eps],
        0.4,
        yerr=[at(fig41[e], 1.0)["std"] for e in eps],
        capsize=3,
        label="empirical ||p - pi*||_1",
    )
    ax.bar(x + 0.2, eps, 0.4, color="tab:red", alpha=0.6, label="threshold epsilon")
    ax.set_xticks(x, [f"{e:g}" for e in eps])
    ax.set_xlabel("epsilon")
    ax.set_ylabel("error at the theoretical minimum")
    ax.set_title("Fig. 4.1: error at the Thm 6 minimum (mean +- std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Fig. 4.2-4.3: tightness sweeps, error against the fraction of the minimum.

# The thesis's sweeps; another eps is ours, and labelled so.
FIGURES = {0.2: "Fig. 4.2", 0.1: "Fig. 4.3"}


def claim_tightness(eps: float, pts: list[dict] | None) -> dict:
    """Fig. 4.2 (eps = 0.2): "0.75x the theoretical sample size yields errors above
    threshold"; Fig. 4.3 (eps = 0.1): "using fewer samples than predicted consistently
    fails to achieve the target error". Both say: every tested fraction < 1 ends above
    eps (the 1.0x half is Thm 6's row).
    """
    name = f"{FIGURES.get(eps, 'tightness sweep (ours, not in the thesis)')} (eps={eps:g})"
    if pts is None:
        return dict(claim=name, ours=NO_MINIMUM, verdict="not reproduced")
    fracs = sorted(p["fraction"] for p in pts)
    fails = [at(pts, f)["mean"] > eps for f in fracs if f < 1.0]
    below = ", ".join(f"{f:g}x" for f in fracs if f < 1.0)
    return dict(
        claim=f"{name}: {below} the minimum give mean error above eps",
        ours="mean error " + "; ".join(f"{f:g}x: {at(pts, f)['mean']:.3f}" for f in fracs),
        verdict=verdict(sum(fails), len(fails)),
    )


def plot_tightness(
    eps: float, pts: list[dict], grid: list[dict], nu: float, title: str, path: str
) -> None:
    """Fig. 4.2 / 4.3: error vs high-return samples per context, with the threshold and the
    minimum."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    n_high, mean = [g["n_high"] for g in grid], [g["mean"] for g in grid]
    ax.plot(n_high, mean, color="0.6", lw=1, label="mean error, fine grid")
    ax.errorbar(
        [p["n_high"] for p in pts],
        [p["mean"] for p in pts],
        yerr=[p["std"] for p in pts],
        fmt="o",
        capsize=3,
        label="mean +- std at the thesis fractions",
    )
    ax.axhline(eps, color="tab:red", ls="--", label=f"epsilon = {eps:g}")
    ax.axvline(nu, color="k", ls=":", label="theoretical minimum (Thm 6)")
    ax.set_xscale("log")
    ax.set_xlabel("high-return samples per context")
    ax.set_ylabel("||p - pi*||_1")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# slack.png: where the mean error reaches eps, as a fraction of the minimum.


def claim_bound_tight(slack: dict) -> dict:
    """§4.7 Discussion: "confirming our bound's tightness". Rubric (ours, the thesis gives none):
    tight if the mean error reaches eps at >= 0.75x the minimum (as Fig. 4.2 states), partly if
    within a factor 2 (>= 0.5x), otherwise the bound is loose by the factor 1/slack."""
    finite = {e: s for e, s in slack.items() if s is not None}
    ours = "; ".join(f"eps={e:g}: {s['fraction']:.3f}x ({s['note']})" for e, s in finite.items())
    tight_n = sum(s["fraction"] >= 0.75 for s in finite.values())
    half_n = sum(s["fraction"] >= 0.5 for s in finite.values())
    if finite and tight_n == len(slack):
        v = "reproduced"
    else:
        v = "partly" if half_n else "not reproduced"
    return dict(
        claim="§4.7: the bound is tight (mean error reaches eps near 1x the minimum)",
        ours="fraction of the minimum where the mean error reaches eps: " + (ours or NO_MINIMUM),
        verdict=v,
    )


def plot_slack(grids: dict, path: str) -> None:
    """Mean error / epsilon against the fraction of the minimum: where each curve crosses 1 is the
    slack."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for eps, grid in grids.items():
        fractions, ratio = [g["fraction"] for g in grid], [g["mean"] / eps for g in grid]
        ax.plot(fractions, ratio, label=f"eps = {eps:g}")
    ax.axhline(1.0, color="tab:red", ls="--")
    ax.axvline(1.0, color="k", ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("high-return samples / theoretical minimum")
    ax.set_ylabel("mean error / epsilon")
    ax.set_title("Slack of Thm 6 (crossing of the dashed line)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# prop5_prop6_regimes.png: the calculator's Prop. 5 and Prop. 6.


def claim_prop5(calc: dict) -> dict:
    return dict(
        claim="Prop. 5 / Eq. 4.20: the two terms of Eq. 4.6 are equal at N*_min",
        ours=f"max |term1 - term2| / term1 at N* = {calc['max_gap_at_nstar']:.1e}",
        verdict="reproduced" if calc["max_gap_at_nstar"] < 1e-9 else "not reproduced",
    )


def claim_prop6(calc: dict) -> dict:
    """Rubric (ours): "approximates" = relative error below 1% at every eps we test."""
    x = calc["eps_over_4c_max"]
    return dict(
        claim="Prop. 6 / Eq. 4.21 approximates N*_min for eps << C^h",
        ours=f"largest relative error over our eps {calc['approx_rel_err_max']:.2e} "
        f"(= (eps/4C^h)^2 = {x**2:.2e}; -> 0 as eps/C^h -> 0)",
        verdict="reproduced" if calc["approx_rel_err_max"] < 1e-2 else "partly",
    )


def plot_regimes(args: Args, eps: float, beta: float, path: str) -> None:
    """Prop. 5 (required nu vs N_min, the two regimes, N*) and Prop. 6 (error of Eq. 4.21 vs
    eps/C^h)."""
    plt = pyplot()
    c, v = args.n_contexts, args.n_actions
    n_star = transition_point(eps, c, v, beta)
    n = np.logspace(np.log10(n_star) - 3, np.log10(n_star) + 3, 200)
    terms = np.array([theorem6_terms(eps, c, v, beta, x) for x in n])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.loglog(n, terms.max(axis=1), "k", lw=2, label="Eq. 4.6 (max)")
    a1.loglog(n, terms[:, 0], "--", label="variance term (small data)")
    a1.loglog(n, terms[:, 1], "--", label="bias term (large data)")
    a1.axvline(n_star, color="tab:red", ls=":", label="N* (Eq. 4.20)")
    a1.set_xlabel("N_min")
    a1.set_ylabel("required nu_min^h")
    a1.set_title(f"Prop. 5: C^h={c}, V={v}, eps={eps:g}, beta={beta:.4g}", fontsize=9)
    a1.legend(fontsize=7)
    # eps / C^h up to the largest meaningful eps = 2 C^h
    ratio = np.logspace(-3, np.log10(2.0), 60)
    rel = [
        1 - transition_point_approx(r * c, c, v, beta) / transition_point(r * c, c, v, beta)
        for r in ratio
    ]
    a2.loglog(ratio, rel, lw=2, label="1 - Eq. 4.21 / Eq. 4.20")
    a2.loglog(ratio, (ratio / 4) ** 2, "k--", lw=1, label="(eps / 4C^h)^2")
    a2.set_xlabel("eps / C^h")
    a2.set_ylabel("relative error of Eq. 4.21")
    a2.set_title("Prop. 6: approximation of N*", fontsize=9)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# No figure: §4.3's definition of beta, read literally.


def claim_global_reading(args: Args, calc: dict) -> dict:
    need = 1 - max(calc["eps_all"]) / (4 * args.n_contexts)
    if args.beta_reading == "global":
        used = "this run uses that reading"
    else:
        used = "we read beta per context"
    return dict(
        claim="Thm 6 with beta_c^h = N_c^h / N as defined in §4.3 (global reading)",
        ours=f"needs beta_min >= 1 - eps/(4C^h) >= {need:.4f} but beta_min <= 1/C^h = "
        f"{1 / args.n_contexts:.4f}: never satisfiable for C^h >= 2 and eps < 2C^h; {used}",
        verdict="not reproduced" if args.n_contexts >= 2 else "reproduced",
    )


def claims_table(args: Args, sweeps: dict, slack: dict, calc: dict) -> list[dict]:
    """Every Chapter 4 claim we test, with our number and a verdict. The rubric for each is in its
    function.

    sweeps maps each epsilon to its run_point results at --fractions (None without a
    finite minimum).
    """
    tight = {e: sweeps[e] for e in args.eps_tightness}
    rows = [claim_thm6_at_minimum(sweeps)]
    rows += [claim_tightness(e, pts) for e, pts in tight.items()]
    rows.append(claim_bound_tight(slack))
    rows.append(claim_proof_halves(sweeps))
    rows.append(claim_prop5(calc))
    rows.append(claim_prop6(calc))
    rows.append(claim_global_reading(args, calc))
    return rows


def print_table(rows: list[dict]) -> None:
    w = max(len(r["claim"]) for r in rows)
    print(f"\n{'thesis claim':<{w}} | ours | verdict")
    print("-" * (w + 40))
    for r in rows:
        print(f"{r['claim']:<{w}} | {r['ours']} | {r['verdict']}")


# --- main -----------------------------------------------------------------------------------------


def validate(args: Args) -> None:
    """Turn bad flags into one clear message instead of a traceback deep inside numpy."""
    if not (args.eps_fig41 or args.eps_tightness):
        raise ValueError("give at least one epsilon with --eps-fig41 or --eps-tightness")
    for e in (*args.eps_fig41, *args.eps_tightness):
        check_inputs(e, args.n_contexts, args.n_actions)
        if e >= 2 * args.n_contexts:
            raise ValueError(
                f"epsilon {e:g} >= 2 C^h = {2 * args.n_contexts}: ||p - pi*||_1 never exceeds "
                "2 C^h, so the claim is empty; use a smaller epsilon"
            )
        # the thesis sweeps eps 0.1-0.5; Prop. 6 and the "near-optimal" reading need eps << C^h
        if e > 1:
            raise ValueError(
                f"epsilon {e:g} > 1: an L1 error of more than 1 over the high-return contexts is "
                "not near-optimal, and the thesis's sweeps use 0.1-0.5; pass an epsilon in (0, 1]"
            )
    if not args.fractions or any(f <= 0 for f in args.fractions) or 1.0 not in args.fractions:
        raise ValueError(f"--fractions must be positive and contain 1.0, got {args.fractions}")
    if not 0.0 <= args.opt_prob <= 1.0 or not 0.0 <= args.uniform_share <= 1.0:
        raise ValueError("--opt-prob and --uniform-share are probabilities and must lie in [0, 1]")
    if args.nu_reading == "fixed-beta":
        if args.low_samples is not None:
            raise ValueError("--low-samples only applies to --nu-reading fixed-low")
        if args.beta is not None and not 0.0 < args.beta <= 1.0:
            raise ValueError(
                f"--beta is a proportion of samples and must lie in (0, 1], got {args.beta}"
            )
    else:
        if args.beta is not None:
            raise ValueError(
                "--beta only applies to --nu-reading fixed-beta (fixed-low derives beta)"
            )
        args.low_samples = 100 if args.low_samples is None else args.low_samples
        if args.low_samples < 0:
            raise ValueError(f"--low-samples must be >= 0, got {args.low_samples}")
    if any(not n >= 0 for n in args.calc_n_min):
        raise ValueError(
            f"--calc-n-min values are sample counts and must be >= 0, got {args.calc_n_min}"
        )
    if args.n_seeds < 2 or args.slack_seeds < 2 or args.slack_points < 2:
        raise ValueError("--n-seeds, --slack-seeds and --slack-points must be >= 2")
    if not 0 < args.slack_min_fraction < max(args.fractions):
        raise ValueError("--slack-min-fraction must be > 0 and below the largest of --fractions")


def make_out_dir(args: Args) -> str:
    """Checked before the work, made at the first write (common.output_folder's rule): a refused or
    failed run leaves no folder behind."""
    name = f"sample_complexity__{args.seed}"
    return str(common.output_folder(args.out_dir, name, args.force, "--out-dir"))


def git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # no git, or not a repository: the summary just says null
        return None


def strict_json(x):
    """Standard JSON has no inf/nan (Python would write Infinity): non-finite numbers become null"""
    if isinstance(x, dict):
        return {str(k): strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def print_readings(args: Args) -> None:
    """The readings this run takes where Chapter 4 leaves a choice open, and the §4.7 policies."""
    print("Readings (thesis Ch. 4 leaves these open):")
    if args.beta_reading == "per-context":
        beta_text = (
            "beta_c^h = N_c^h / N_c, so nu_min^h = beta N_min is the number "
            "of high-return samples in a context (§4.5's words)"
        )
    else:
        beta_text = "beta_c^h = N_c^h / N as in §4.3; Thm 6 then has no finite minimum for C^h >= 2"
    print(f"  beta: {args.beta_reading} -- " + beta_text)
    if args.nu_reading == "fixed-beta":
        if args.beta is None:
            beta = "1 - eps/(4C^h) per eps (smallest Thm 6 allows)"
        else:
            beta = f"{args.beta:g}"
        nu_text = (
            "share beta of high-return samples fixed per context, context size scaled; beta = "
        )
        nu_text += beta
    else:
        nu_text = f"{args.low_samples} low-return samples per context, high-return samples added"
    print(f"  nu:   {args.nu_reading} -- " + nu_text)
    print(
        f"  policies: pi* = optimal ({args.opt_prob:g} on action 0); low-return samples: "
        f"{args.uniform_share:g} uniform + {1 - args.uniform_share:g} suboptimal "
        f"({args.opt_prob:g} on the last action); C^h = {args.n_contexts} high-return contexts, "
        f"V = {args.n_actions} actions"
    )


def calculator_row(args: Args, e: float) -> tuple[dict, float]:
    """Eq. 4.6, 4.20 and 4.21 at one epsilon, with beta = beta_min^h of the dataset at the minimum;
    also the gap between Eq. 4.6's two terms at N* (Prop. 5 says 0)."""
    c, v = args.n_contexts, args.n_actions
    nu = required_high(e, args)
    n_high, n_low = design(1.0, e, args) if math.isfinite(nu) else (0, 0)
    # Without a finite minimum there is no dataset; show the share the design would aim at instead.
    if math.isfinite(nu):
        beta = n_high / (n_high + n_low)
    else:
        beta = beta_for(e, args) / (c if args.beta_reading == "global" else 1)
    n_star, n_apx = transition_point(e, c, v, beta), transition_point_approx(e, c, v, beta)
    t1, t2 = theorem6_terms(e, c, v, beta, n_star)
    row = dict(
        eps=e,
        beta=beta,
        n_variance=(c * v / e) ** 2,
        n_star=n_star,
        n_star_approx=n_apx,
        approx_rel_err=1 - n_apx / n_star,
        nu_min=nu,
        regime_at_min=regime(n_high + n_low, n_star) if math.isfinite(nu) else "-",
    )
    return row, abs(t1 - t2) / t1


def print_no_minimum(args: Args, rows: list[dict]) -> None:
    """Say why an epsilon has no finite minimum (Eq. 4.19 fails at every sample size)."""
    c = args.n_contexts
    for r in rows:
        if math.isfinite(r["nu_min"]):
            continue
        e = r["eps"]
        if args.beta_reading == "global":
            why = f"the global reading caps beta_min at 1/C^h = {1 / c:g}"
        else:
            why = f"--beta {r['beta']:g} < 1 - eps/(4C^h) = {1 - e / (4 * c):g}"
        print(
            f"  eps={e:g}: no finite minimum: "
            + why
            + ", so the bias condition (Eq. 4.19) fails at every sample size; nothing is sampled"
        )


def regimes_at_n_min(args: Args, rows: list[dict]) -> list[dict]:
    """Prop. 5's regimes: Eq. 4.6's two terms at each --calc-n-min, for every epsilon."""
    c, v = args.n_contexts, args.n_actions
    if args.calc_n_min:
        print(
            "\n"
            "Prop. 5 regimes: Eq. 4.6 at given N_min (--calc-n-min; '<<' read as a factor 10 from "
            "N*)"
        )
        print(
            f"{'eps':>5} {'N_min':>10} {'variance 4.13':>14} {'bias 4.19':>12} {'required nu':>12} "
            f"{'regime':>11}"
        )
    at_n_min = []
    for r in rows:
        for n_min in args.calc_n_min:
            t1, t2 = theorem6_terms(r["eps"], c, v, r["beta"], n_min)
            at_n_min.append(
                dict(
                    eps=r["eps"],
                    beta=r["beta"],
                    n_min=n_min,
                    variance_term=t1,
                    bias_term=t2,
                    required_nu=max(t1, t2),
                    regime=regime(n_min, r["n_star"]),
                )
            )
            print(
                f"{r['eps']:>5g} {n_min:>10.3g} {t1:>14.4g} {t2:>12.4g} {max(t1, t2):>12.4g} "
                f"{at_n_min[-1]['regime']:>11}"
            )
    return at_n_min


def calculator(args: Args, eps_all: list[float]) -> dict:
    """Thm 6, Prop. 5 and Prop. 6 at the experiment's settings, printed as a table."""
    print(
        "\n"
        "Calculator (Eq. 4.6, 4.20, 4.21); beta = beta_min^h of the dataset at the minimum "
        "(chosen reading)"
    )
    print(
        f"{'eps':>5} {'beta':>8} {'(CV/eps)^2':>11} {'N* 4.20':>11} {'N* 4.21':>11} "
        f"{'rel.err':>9} {'nu_min^h':>10} {'regime at min':>14}"
    )
    rows, gaps = [], []
    for e in eps_all:
        row, gap = calculator_row(args, e)
        rows.append(row)
        gaps.append(gap)
        print(
            f"{e:>5g} {row['beta']:>8.5f} {row['n_variance']:>11.0f} {row['n_star']:>11.1f} "
            f"{row['n_star_approx']:>11.1f} {row['approx_rel_err']:>9.2e} {row['nu_min']:>10.0f} "
            f"{row['regime_at_min']:>14}"
        )
    print_no_minimum(args, rows)
    return dict(
        rows=rows,
        at_n_min=regimes_at_n_min(args, rows),
        max_gap_at_nstar=max(gaps),
        approx_rel_err_max=max(r["approx_rel_err"] for r in rows),
        eps_over_4c_max=max(eps_all) / (4 * args.n_contexts),
        eps_all=eps_all,
    )


def run_experiments(args: Args, rng, eps_all: list[float], pi_opt, pi_low):
    """§4.7: the thesis's fractions (Fig. 4.1-4.3) and a fine grid to locate the slack, per eps."""
    grid_fracs = np.logspace(
        np.log10(args.slack_min_fraction), np.log10(max(args.fractions)), args.slack_points
    )
    sweeps, grids, slack = {}, {}, {}
    for e in tqdm(eps_all, desc="epsilon"):
        sweeps[e] = sweep(rng, e, args.fractions, args, args.n_seeds, pi_opt, pi_low)
        grids[e] = sweep(rng, e, grid_fracs, args, args.slack_seeds, pi_opt, pi_low)
        if grids[e] is None:
            slack[e] = None
            continue
        f, note = slack_fraction(grid_fracs, [g["mean"] for g in grids[e]], e)
        at_min = at(sweeps[e], 1.0)["mean"] / e
        slack[e] = dict(fraction=f, note=note, error_at_min_over_eps=at_min)
    return sweeps, grids, slack


def print_slack_sources(eps_all: list[float], sweeps: dict, slack: dict) -> None:
    """Eq. 4.12 and 4.18 at the minimum: how much of its eps/2 each half of the proof uses."""
    print(
        "\n"
        "Where the slack comes from, at the theoretical minimum (each half of the proof gets "
        "eps/2):"
    )
    for e in eps_all:
        if sweeps[e]:
            q = at(sweeps[e], 1.0)
            print(
                f"  eps={e:g}: error/eps {q['mean'] / e:.2f}; variance term / (eps/2) "
                f"{q['variance_term'] / (e / 2):.2f} (Eq. 4.12 allows 1); bias term / (eps/2) "
                f"{q['bias_term'] / (e / 2):.2f} (Eq. 4.18 allows 1); mean error reaches eps at "
                f"{slack[e]['fraction']:.3f}x the minimum"
            )


def draw_figures(args: Args, out: str, calc: dict, sweeps: dict, grids: dict) -> list[str]:
    """Fig. 4.1-4.3, the slack and Prop. 5-6's regimes; returns the files written."""
    figures = []
    os.makedirs(out, exist_ok=True)
    fig41 = {e: sweeps[e] for e in args.eps_fig41}
    if any(fig41.values()):
        plot_fig41(fig41, os.path.join(out, "fig4_1_error_at_minimum.png"))
        figures.append("fig4_1_error_at_minimum.png")
    for i, e in enumerate(args.eps_tightness):
        if pts := sweeps[e]:
            name = f"fig4_{2 + i}_tightness_eps{e:g}.png"
            plot_tightness(
                e,
                pts,
                grids[e],
                required_high(e, args),
                f"Fig. 4.{2 + i}: error vs high-return samples, eps = {e:g}",
                os.path.join(out, name),
            )
            figures.append(name)
    if any(g for g in grids.values()):
        plot_slack({e: g for e, g in grids.items() if g}, os.path.join(out, "slack.png"))
        figures.append("slack.png")
    eps_all = calc["eps_all"]
    e0 = min(eps_all, key=lambda e: abs(e - 0.2))
    beta = calc["rows"][eps_all.index(e0)]["beta"]
    plot_regimes(args, e0, beta, os.path.join(out, "prop5_prop6_regimes.png"))
    figures.append("prop5_prop6_regimes.png")
    return figures


def write_summary(args: Args, out: str, results: dict, t0: float) -> dict:
    """summary.json: the config, the readings, every number behind the table and figures."""
    grid_keys = ("fraction", "n_high", "n_low", "mean", "std")
    summary = dict(
        script="sample_complexity.py",
        config=asdict(args),
        git_commit=git_commit(),
        readings=dict(
            beta=args.beta_reading,
            nu=args.nu_reading,
            suboptimal_policy="opt_prob on the last action (mirror of the optimal policy)",
            high_return_contexts="all n_contexts states",
            regime_margin=10.0,
        ),
        calculator=results["calc"],
        thesis_fractions={str(e): p for e, p in results["sweeps"].items()},
        slack={str(e): s for e, s in results["slack"].items()},
        slack_grid={
            str(e): g and [{k: x[k] for k in grid_keys} for x in g]
            for e, g in results["grids"].items()
        },
        claims=results["claims"],
        figures=results["figures"],
        wall_time_s=time.time() - t0,
    )
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(strict_json(summary), fh, indent=1, allow_nan=False)
    figures = ", ".join(summary["figures"])
    print(f"\nwrote {figures} and summary.json to {out} ({summary['wall_time_s']:.1f} s)")
    return summary


def main(args: Args) -> dict:
    t0 = time.time()
    try:
        validate(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = make_out_dir(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    pi_opt, pi_low = make_policies(args.n_actions, args.opt_prob, args.uniform_share)
    print_readings(args)

    eps_all = sorted(set(args.eps_fig41) | set(args.eps_tightness))
    calc = calculator(args, eps_all)
    sweeps, grids, slack = run_experiments(args, rng, eps_all, pi_opt, pi_low)
    print_slack_sources(eps_all, sweeps, slack)
    rows = claims_table(args, sweeps, slack, calc)
    print_table(rows)

    figures = draw_figures(args, out, calc, sweeps, grids)
    results = dict(calc=calc, sweeps=sweeps, grids=grids, slack=slack, claims=rows, figures=figures)
    return write_summary(args, out, results, t0)


if __name__ == "__main__":
    main(tyro.cli(Args))
