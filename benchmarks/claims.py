"""The thesis's published numbers and one rule for judging ours against them (used by aggregate.py,
attention.py and grad_cosines.py, and on its own for run folders):

    python benchmarks/claims.py runs/RUN_A runs/RUN_B ...   # thesis claim | ours | verdict, per run

A score is "reproduced" within one of the thesis's standard deviations, "partly" within two, else
"not reproduced". Table 1.3 prints a standard deviation over its 10 seeds for MO-DT and TRDT; where
the thesis prints none (DT, ODT-O, Table 2.1), the spread is ours (over seeds, or over evaluation
episodes for a single run). A run trained with other settings than the thesis's is "not comparable"
(so is every method, the quoted baselines too, at a budget other than the one behind its number),
and numbers from other data than official D4RL always say so.

An ordering the thesis states (ORDERINGS: Table 1.3's TRDT > MO-DT > DT, Table 2.1's RGDT > DT
and RGDT > 10%BC, Fig. 2.3's final-token RGDT > full-context RGDT) is judged on our seeds by
`ordering_verdict`: the probability of improvement P(X > Y) (rliable, Agarwal et al. 2021) with
its 95% stratified-bootstrap CI "holds" where the CI's lower end is above 0.5, "does not hold"
where its upper end is below 0.5, else "not decidable with these seeds". rliable is the optional
extra `stats`: pip install -e ".[stats]".
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

TABLE_1_3 = [
    f"{e}-{lvl}"
    for lvl in ("medium", "medium-replay", "medium-expert")
    for e in ("halfcheetah", "hopper", "walker2d")
]
TABLE_2_1 = [
    f"{e}-{lvl}"
    for lvl in ("medium", "medium-expert")
    for e in ("halfcheetah", "hopper", "walker2d")
]

# The thesis's published numbers (official D4RL v2, 10 seeds). DT: the DT paper's values where Table
# 1.3 was damaged in extraction (9.79, 9.99, 8.98 -> 67.6, 66.6, 86.8). ODT-O: the thesis's column;
# its printed total (674.06) is not the sum of its rows (682.06). Table 2.1's printed RGDT total is
# 539.0, its rows sum to 540.0.
# rows in the tables' order: halfcheetah, hopper, walker2d x medium, medium-replay, medium-expert
THESIS = {
    "dt": dict(zip(TABLE_1_3, [42.6, 67.6, 74.0, 36.6, 82.7, 66.6, 86.8, 107.6, 108.1])),
    "dt-gaussian": dict(
        zip(TABLE_1_3, [42.72, 66.95, 72.19, 39.99, 86.64, 68.92, 88.76, 107.24, 108.65])
    ),
    "mo_dt": dict(zip(TABLE_1_3, [43.34, 67.45, 78.56, 40.93, 79.43, 81.3, 94.57, 111.71, 108.08])),
    "trdt": dict(zip(TABLE_1_3, [43.20, 65.89, 75.89, 42.61, 97.82, 86.94, 94.37, 111.53, 108.52])),
    "rgdt": dict(zip(TABLE_2_1, [44.4, 93.2, 83.3, 93.4, 112.4, 113.3])),  # medium, medium-expert
    # Baselines the thesis quotes, not trains (benchmarks/bc.py measures them on our data): Table
    # 1.3's BC column is the IQL paper's (rows sum to its printed total 466.7), its 10% BC column
    # the DT paper's (666.2); Table 2.1's 10% BC column prints the same six medium / medium-expert
    # numbers (487.2).
    "bc": dict(zip(TABLE_1_3, [42.6, 52.9, 75.3, 36.6, 18.1, 26.0, 55.2, 52.5, 107.5])),
    "bc-10": dict(zip(TABLE_1_3, [42.5, 56.9, 75.0, 40.6, 75.9, 62.5, 92.9, 110.9, 109.0])),
}
THESIS_STD = {  # Table 1.3 prints ± (over its 10 seeds) for MO-DT and TRDT only
    "mo_dt": dict(zip(TABLE_1_3, [3.34, 11.21, 6.30, 2.13, 5.2, 9.72, 2.78, 1.52, 0.54])),
    "trdt": dict(zip(TABLE_1_3, [3.0, 8.38, 7.26, 2.0, 2.3, 6.23, 3.19, 1.31, 0.45])),
}
# The budget (gradient updates) behind each number: Table 1.1's 10^5 for MO-DT and TRDT, the DT
# paper's 10^5 for DT and ODT-O, §2.4's for RGDT. The quoted BC / 10% BC columns print none: theirs
# is what benchmarks/bc.py and run.py's `thesis` preset run, CORL's any_percent_bc default.
BUDGET = {"dt": 100_000, "dt-gaussian": 100_000, "bc": 1_000_000, "bc-10": 1_000_000}
PRINTED_TOTALS = {
    "dt": 672.6,
    "dt-gaussian": 674.06,
    "mo_dt": 705.37,
    "trdt": 726.77,
    "rgdt": 539.0,
}
SOURCE_LABEL = {
    "d4rl": "official D4RL",
    "minari": "Minari",
    "replica": "replica (not D4RL)",
    "file": "local file",
}

# The configurations the thesis's numbers were measured with; a run is judged only when it matches.
TABLE_1_1 = dict(n_layer=4, n_head=4, n_embd=256, context_len=20, dropout=0.1, batch_size=256,
                 lr=1e-4, weight_decay=1e-3, grad_clip=0.25, warmup_steps=10_000,
                 gaussian_heads=True, timestep_embedding=False, schedule="joint",
                 rtg_update="model", updates=100_000)  # fmt: skip
TABLE_1_2 = {"hopper": 7200.0, "walker2d": 10000.0, "halfcheetah": 12000.0}
SECTION_2_4 = dict(n_enc_layer=2, n_layer=3, n_head=2, n_embd=64, return_len=20, state_len=5,
                   lr=5e-4, warmup_steps=10_000, weight_decay=1e-3, dropout=0.1, updates=150_000,
                   batch_size=256, inv_hidden=512, inv_layers=2, inv_lr=1e-4, inv_weight_decay=1e-4,
                   inv_dropout=0.1, inv_updates=200_000, inv_batch_size=1024,
                   full_context_loss=False, target_return=None)  # fmt: skip


# The orderings the thesis states, judged on each of `rows` both columns have (run.py's method keys;
# "rgdt-full-context": rgdt.py --full-context-loss). Table 1.3's totals: TRDT > MO-DT > DT.
MEDIUM = [d for d in TABLE_2_1 if d.endswith("-medium")]
ORDERINGS = [
    dict(source="Table 1.3", better="trdt", worse="mo_dt", rows=TABLE_1_3),
    dict(source="Table 1.3", better="mo_dt", worse="dt", rows=TABLE_1_3),
    dict(source="Table 1.3", better="trdt", worse="dt", rows=TABLE_1_3),
    dict(source="Table 2.1", better="rgdt", worse="dt", rows=TABLE_2_1),
    dict(source="Table 2.1", better="rgdt", worse="bc-10", rows=TABLE_2_1),
    dict(source="Fig. 2.3", better="rgdt", worse="rgdt-full-context", rows=MEDIUM),
]
CI = 0.95  # the size of every confidence interval
BOOTSTRAP_SEED = 0  # every CI from one fixed seed: the same results give the same verdicts
UNDECIDED = "not decidable with these seeds"


def rliable():
    """rliable's library and metrics, imported only where statistics are asked for (an extra)."""
    try:
        from rliable import library, metrics
    except ImportError:
        missing = "error: IQM, bootstrap CIs and P(X > Y) need rliable"
        raise SystemExit(f'{missing}: pip install -e ".[stats]"') from None
    except Exception as e:  # arch 7 (rliable wants arch < 8) fails at import under pandas 3
        broken = f"error: rliable is installed but does not import ({type(e).__name__}: {e})"
        raise SystemExit(f'{broken}; pip install -e ".[stats]" "pandas<3"') from None
    return library, metrics


@contextlib.contextmanager
def seeded(seed: int = BOOTSTRAP_SEED):
    """rliable's stratified bootstrap draws its indices from numpy's global generator: seed it for
    the call and give the caller's state back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def ordering_verdict(x_scores, y_scores, reps: int = 2000) -> dict:
    """The rule for "X > Y": P(X > Y), the probability that a run of X scores above a run of Y
    (rliable's probability of improvement, averaged over tasks; scores of shape (runs,) or (runs,
    tasks)), with its 95% stratified-bootstrap CI: "holds" where the CI's lower end is above 0.5,
    "does not hold" where its upper end is below 0.5, else "not decidable with these seeds".
    The percentile bootstrap gives [1, 1] whenever every X run beats every Y run, and with few runs
    that happens by chance more often than the CI's 2.5% tail allows (1 in C(nx + ny, nx): 1 in 6
    for 2 vs 2, 1 in 20 for 3 vs 3): below 4 vs 4 (or 3 vs 5, 2 vs 8) no scores can decide."""
    x = np.asarray(x_scores, dtype=float).reshape(len(x_scores), -1)
    y = np.asarray(y_scores, dtype=float).reshape(len(y_scores), -1)
    n = (len(x), len(y))
    library, metrics = rliable()
    if math.comb(n[0] + n[1], n[0]) * (1 - CI) / 2 < 1:
        p = float(metrics.probability_of_improvement(x, y))
        few = f"{UNDECIDED} ({n[0]} vs {n[1]}: too few for a 95% CI)"
        return dict(p=p, ci=None, n=n, verdict=few)
    pair, bootstrap = {"x>y": (x, y)}, dict(reps=reps, confidence_interval_size=CI)
    poi = metrics.probability_of_improvement
    with seeded():
        point, ci = library.get_interval_estimates(pair, poi, **bootstrap)
    p, (lo, hi) = float(point["x>y"]), np.ravel(ci["x>y"]).tolist()
    judged = "holds" if lo > 0.5 else ("does not hold" if hi < 0.5 else UNDECIDED)
    return dict(p=p, ci=(lo, hi), n=n, verdict=judged)


def verdict(ours: float, thesis: float, std: float) -> str:
    """The one rule: within one standard deviation reproduced, within two partly."""
    gap = abs(ours - thesis)
    return "reproduced" if gap <= std else ("partly" if gap <= 2 * std else "not reproduced")


def method_of(results: dict) -> str:
    """The thesis column a run belongs to: its method file, and dt.py's Gaussian policy as
    ODT-O's."""
    method = results.get("method") or results["args"]["exp_name"]
    if method == "bc":  # X%BC is judged against its own column
        pct = results["args"].get("top_pct", 100)
        return "bc" if pct == 100 else f"bc-{pct:g}"
    gaussian = results.get("arch", results["args"]).get("policy") == "gaussian"
    return "dt-gaussian" if method == "dt" and gaussian else method


def differences(results: dict) -> list[str]:
    """Settings of a run (results.json) that differ from the configuration behind the thesis's
    number."""
    method, args = (
        method_of(results),
        {**results.get("trained_with", results["args"]), **results.get("arch", {})},
    )
    args["updates"] = results.get("trained_updates", results.get("updates"))
    if method == "rgdt":
        args["inv_updates"] = results.get("trained_inv_updates", results.get("inv_updates"))
        return [k for k, v in SECTION_2_4.items() if args.get(k) != v]
    if method not in ("mo_dt", "trdt"):
        # DT's and the baselines' columns are other papers' configurations: we judge their budget
        return [] if args["updates"] == BUDGET.get(method, args["updates"]) else ["updates"]
    differs = [k for k, v in TABLE_1_1.items() if args.get(k) != v]
    differs += (
        []
        if all(abs(x - 1 / len(args["lambdas"])) < 1e-6 for x in args["lambdas"])
        else ["lambdas"]
    )
    differs += [] if method == "mo_dt" or args.get("bins") == 3 else ["bins"]
    domain = results["dataset"]["name"].split("-")[0]
    # older results kept it in args only
    target = results.get("target_return", args.get("target_return"))
    differs += [] if target == TABLE_1_2.get(domain) else ["target_return (Table 1.2)"]
    return differs


def score_claim(results: dict) -> dict | None:
    """thesis claim | ours | verdict for one run's results.json (None when the thesis has no
    number)."""
    method = method_of(results)
    name, source = results["dataset"]["name"], results["dataset"]["source"]
    thesis = THESIS.get(method, {}).get(name)
    if thesis is None:
        return None
    std = THESIS_STD.get(method, {}).get(name)
    table = "Table 2.1" if method == "rgdt" else "Table 1.3"
    claim = (
        f"{table} {method} {name}: {thesis}"
        + (f" ± {std}" if std is not None else "")
        + " (official D4RL)"
    )
    updates = results.get("trained_updates", results["updates"])
    score = f"{results['normalized_mean']:.2f} ± {results['normalized_std']:.2f}"
    ours = f"{score} over {len(results['returns'])} episodes, {updates} updates, "
    ours += f"{SOURCE_LABEL[source]} data"
    differs = differences(results)
    if differs:
        judged = f"not comparable: differs from the thesis's configuration in {', '.join(differs)}"
    else:  # no printed spread: ours, over the evaluation episodes
        judged = verdict(
            results["normalized_mean"],
            thesis,
            std if std is not None else results["normalized_std"],
        )
    if source != "d4rl":
        judged += f" ({SOURCE_LABEL[source]} data, not the thesis's files)"
    return dict(claim=claim, ours=ours, verdict=judged)


def later_blocks_claim(
    method: str, mass_per_block: list[list[float]], modalities: list[str], samples: int
) -> dict:
    """§1.5.2: later blocks "predominantly engage with ... action tokens over return or state
    tokens" (TRDT: "divided between action regions and action tokens"). Reproduced when every block
    after the first puts more mass on the favoured modalities together than on any other; partly
    when only the last one does."""
    favoured = ("actions", "regions") if method == "trdt" else ("actions",)
    figure = {"dt": "Fig. 1.1 (DT, for contrast)", "mo_dt": "Fig. 1.2", "trdt": "Fig. 1.3"}[method]
    claim = (
        f"{figure}, §1.5.2: later blocks attend predominantly to {' and '.join(favoured)} over the "
        "other tokens"
    )
    shares = [", ".join(f"{k} {v:.2f}" for k, v in zip(modalities, m)) for m in mass_per_block]
    ours = "; ".join(f"block {i + 1}: {share}" for i, share in enumerate(shares))
    if not samples or len(mass_per_block) < 2:
        return dict(
            claim=claim, ours=ours, verdict="not measured: no full-context step, or one block only"
        )
    wins = []
    for mass in mass_per_block[1:]:
        m = dict(zip(modalities, mass))
        wins.append(sum(m[k] for k in favoured) > max(v for k, v in m.items() if k not in favoured))
    return dict(
        claim=claim,
        ours=ours,
        verdict="reproduced" if all(wins) else ("partly" if wins[-1] else "not reproduced"),
    )


def print_claims(rows: list[dict]) -> None:
    print("thesis claim | ours | verdict")
    for row in rows:
        print(f"{row['claim']} | {row['ours']} | {row['verdict']}")


@dataclass
class Args:
    """Judge finished runs against the thesis: thesis claim | ours | verdict, one line per claim."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """run folders of dt.py, mo_dt.py, trdt.py or rgdt.py (each holds results.json)"""


def main(args: Args) -> list[dict]:
    rows = []
    for run in map(Path, args.runs):
        if not (run / "results.json").is_file():
            raise SystemExit(
                f"error: {run}: no results.json; pass a finished run folder (runs/RUN)."
            )
        row = score_claim(json.loads((run / "results.json").read_text()))
        rows += [row] if row else []
    print_claims(rows)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))
