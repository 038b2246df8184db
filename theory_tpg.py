"""Token-Priority Graphs for single-task vs multi-task attention (thesis §1.6, Thm 1, Fig. 1.5-1.6).

Reproduces the theory section of Chapter 1 of "Supervised Learning Methods for Offline
Reinforcement Learning" (A. Ghanem, 2025), which applies the Token-Priority Graph (TPG)
framework of Li, Huang, Ildiz, Rawat, Oymak, "Mechanics of Next Token Prediction with
Self-Attention", AISTATS 2024 (thesis ref. [33]) to a toy Decision Transformer:

  1. a one-matrix self-attention layer (Eq. 1.18) with orthogonal prediction heads, so a task's
     score is the attention paid to its target token (Eq. 1.19-1.24);
  2. one TPG per query token, built from the data, for the action-only loss L_a and for the
     multi-task loss L_a + L_s (Eq. 1.25), with their strongly connected components (SCCs);
  3. the two Graph-SVM problems (Eq. 1.26-1.31) and the finite "cyclic subspace" component
     W_fin of [33];
  4. normalized gradient descent (Eq. 1.34) from §1.6.5, tracking the correlation of Eq. 1.35.

Run:  python theory_tpg.py            (≈ 10 s on 2 CPU cores)
      python theory_tpg.py --help     (every setting is a flag)
"""

import json
import os
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Optional

import cvxpy as cp
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from scipy.linalg import orth  # noqa: E402
from scipy.special import softmax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import common  # noqa: E402


@dataclass
class Args:
    seed: int = 1
    """master seed; trial i draws its data, embeddings and initialization from seed + i"""
    n_state_tokens: int = 3
    """|S|, state tokens in the vocabulary (§1.6.5: 3)"""
    n_action_tokens: int = 3
    """|A|, action tokens in the vocabulary (§1.6.5: 3); |V| = |S| + |A|"""
    d_in: int = 8
    """embedding dimension d_in (§1.6.5: 8); must be >= |V| so the embeddings have full row rank"""
    n_samples: int = 6
    """N, training sequences per trial (§1.6.5: 6)"""
    seq_len: int = 4
    """K, tokens per sequence (§1.6.5: 4); even, laid out (s, a, s, a, ...) so the query is an
    action"""
    steps: int = 4000
    """iterations of normalized gradient descent, Eq. 1.34 (§1.6.5: 4000)"""
    lr: float = 0.01
    """step size eta of Eq. 1.34 (§1.6.5: 0.01)"""
    trials: int = 10
    """independent trials, each with new data, embeddings and initialization (§1.6.5: 10)"""
    init_std: float = 0.01
    """std of the i.i.d. Gaussian entries of W(0) (not given in the thesis; small, as in
    implicit-bias studies)"""
    max_redraws: int = 100
    """how many times a trial may redraw its data when a Graph-SVM solution is zero (no acyclic
    pair)"""
    heatmap_trial: int = 0
    """which trial's attention maps and TPGs are drawn (Fig. 1.5, Fig. 1.6c-d)"""
    out_dir: Optional[str] = None
    """output folder; default a new runs/theory_tpg__{seed}__{unix time}; one that holds files only
    with --force"""
    force: bool = False
    """write into an --out-dir that already holds files, overwriting those of the same name"""


# Verdict thresholds, fixed before looking at any result (see claims_table).
# Thm 1 / §1.6.5: the final Eq. 1.35 correlation counted as "converged in direction"
CORR_REPRODUCED = 0.95
CORR_PARTLY = 0.80
NEGLIGIBLE_MASS = 0.05  # Fig. 1.6c: "negligible attention to state tokens"
BALANCED_MASS = (0.25, 0.75)  # Fig. 1.6d: "balanced attention across token types"
ZERO_TOL = 1e-6  # a Graph-SVM solution with smaller Frobenius norm is the zero matrix
# Clarabel's default 1e-8 gap tolerances leave ~1e-4 relative error on the exponential-cone
# problem of W_fin; tighter settings cost milliseconds here.
SOLVER = dict(
    solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10, tol_ktratio=1e-8
)


# ----------------------------------------------------------------------------------------------
# §1.6.1 Vocabulary, embeddings, prediction heads and data
# ----------------------------------------------------------------------------------------------
# Token ids interleave the modalities: even ids are state tokens, odd ids are action tokens
# (s0, a0, s1, a1, ...). This matches Fig. 1.6's "even indices represent state tokens and odd
# indices represent action tokens" both in token space and in position space (sequences are
# laid out s, a, s, a, ...).


def is_state(token):
    return np.asarray(token) % 2 == 0


def token_name(token: int) -> str:
    return f"{'s' if token % 2 == 0 else 'a'}{token // 2}"


def vocabulary(n_state_tokens: int, n_action_tokens: int):
    """State and action token ids under the interleaved numbering."""
    states = [2 * i for i in range(n_state_tokens)]
    actions = [2 * i + 1 for i in range(n_action_tokens)]
    return np.array(states), np.array(actions)


def make_embeddings(rng: np.random.Generator, vocab_size: int, d_in: int) -> np.ndarray:
    """Token embedding matrix E (row t = h_t). Gaussian rows are linearly independent with
    probability 1; we check it because technical condition 1 of §1.6.1 needs full row rank."""
    E = rng.standard_normal((vocab_size, d_in)) / np.sqrt(d_in)
    assert np.linalg.matrix_rank(E) == vocab_size
    return E


def prediction_heads(E: np.ndarray) -> np.ndarray:
    """Rows w_t with w_t . h_t' = 1 if t == t' else 0 for ALL token pairs (C E^T = I).

    Eq. 1.19-1.20 only ask for orthogonality within a modality (w^a vs other action tokens).
    That is not enough: a state token in the context would then leak into the action score and
    the score would no longer be the attention on the target. We impose it across modalities,
    as [33] does, so Eq. 1.21-1.22 reduce to "attention mass on the target token"."""
    return np.linalg.solve(E @ E.T, E)


def make_sequences(rng, n_samples, seq_len, states, actions):
    """N sequences laid out (s, a, s, a, ...), tokens uniform within their modality.

    The thesis does not say how the §1.6.5 data were drawn; this layout mirrors a DT trajectory
    and makes the query (last token) an action token."""
    X = np.empty((n_samples, seq_len), dtype=int)
    X[:, 0::2] = rng.choice(states, size=(n_samples, seq_len // 2))
    X[:, 1::2] = rng.choice(actions, size=(n_samples, seq_len // 2))
    return X


def make_labels(rng, X):
    """Targets a^[i] and s^[i]: uniform over the distinct action / state tokens of sequence i.
    Drawing them from the sequence itself enforces realizability (technical condition 3)."""
    a = np.array([rng.choice(np.unique(x[~is_state(x)])) for x in X])
    s = np.array([rng.choice(np.unique(x[is_state(x)])) for x in X])
    return a, s


def task_dataset(X, a, s, multi_task: bool):
    """(sequences, labels) of one single-label loss.

    L_a (Eq. 1.23) uses the pairs (X_i, a_i). L_a + L_s (Eq. 1.25) equals 2x the single-label
    loss on the doubled dataset {(X_i, a_i)} u {(X_i, s_i)}; normalized GD (Eq. 1.34) ignores the
    factor 2, so every function below handles both losses through this one dataset."""
    if not multi_task:
        return X, a
    return np.concatenate([X, X]), np.concatenate([a, s])


# ----------------------------------------------------------------------------------------------
# Eq. 1.18-1.24 Simplified self-attention, scores, loss and its gradient
# ----------------------------------------------------------------------------------------------


def attention(W, E, X):
    """sigma(H W h_bar) of Eq. 1.18 for every sequence: (N, K) softmax weights over positions."""
    H = E[X]  # (N, K, d_in), H^[i] of Eq. 1.18
    query = H[:, -1]  # h_bar^[i] = h_K^[i]
    return softmax(np.einsum("nkd,de,ne->nk", H, W, query), axis=1)


def loss_and_grad(W, E, C, X, y):
    """Negative log-likelihood of Eq. 1.23 (or 1.25 on the doubled dataset) and its gradient.

    With z = H W h_bar, s = softmax(z), u_t = w_y . h_{x_t} and score v = w_y . H^T s = u . s
    (Eq. 1.21), the chain rule through the softmax gives d(-log v)/dz = -s * (u - v) / v, and
    dL/dW = (1/N) sum_i H_i^T (dl/dz)_i h_bar_i^T. Under orthogonal heads u_t = 1[x_t = y], so
    dl/dz = s - q with q the attention renormalised onto the target positions.

    u_t - v is evaluated as sum_j s_j (u_t - u_j): once attention saturates, v = 1 - 1e-17 rounds
    to 1 and "u_t - v" would lose the tiny signal that normalized GD then blows up to step size."""
    H = E[X]
    query = H[:, -1]
    s = attention(W, E, X)
    u = np.einsum("nkd,nd->nk", H, C[y])
    v = (s * u).sum(axis=1)  # Eq. 1.21; = attention on the target under orthogonal heads
    u_minus_v = np.einsum("nj,nkj->nk", s, u[:, :, None] - u[:, None, :])
    dz = -s * u_minus_v / v[:, None]
    grad = np.einsum("nk,nkd,ne->de", dz, H, query) / len(X)
    return float(np.mean(-np.log(v))), grad


# ----------------------------------------------------------------------------------------------
# §1.6.2-1.6.3 Token-Priority Graphs (one per query token, as in [33])
# ----------------------------------------------------------------------------------------------


def build_tpgs(X, y):
    """{query token k: G^(k)}. Each sample (X_i, y_i) whose last token is k adds an edge
    y_i -> j for every token j != y_i in X_i (the query included): the label must out-rank
    everything it was seen with. Nodes are the tokens seen with query k."""
    graphs = {}
    for x, label in zip(X, y):
        G = graphs.setdefault(int(x[-1]), nx.DiGraph())
        G.add_nodes_from(int(t) for t in x)
        G.add_edges_from((int(label), int(t)) for t in set(x.tolist()) if t != label)
    return dict(sorted(graphs.items()))


def priority_pairs(G):
    """Pairs (i, j) with i ≍ j (same SCC, Eq. 1.27 / 1.30) and i ⇒ j (path i to j but none back,
    Eq. 1.28 / 1.31). SCCs come from networkx; ⇒ is reachability in the condensation DAG (one
    node per SCC). Using all ⇒ pairs or only the cross-SCC edges gives the same feasible set."""
    dag = nx.condensation(G)
    members = {c: sorted(dag.nodes[c]["members"]) for c in dag.nodes}
    equal = [(i, j) for m in members.values() for a, i in enumerate(m) for j in m[a + 1 :]]
    strict = [
        (i, j)
        for c in dag.nodes
        for c2 in nx.descendants(dag, c)
        for i in members[c]
        for j in members[c2]
    ]
    return equal, strict


def sccs(G):
    return [sorted(c) for c in nx.strongly_connected_components(G)]


# ----------------------------------------------------------------------------------------------
# Eq. 1.26-1.31 Graph-SVM and the cyclic-subspace component of [33]
# ----------------------------------------------------------------------------------------------


def constraint_rows(E, k, pairs):
    """Each pair (i, j) of graph G^(k) gives the linear functional (h_i - h_j)^T W h_k on
    vec(W) (row-major), i.e. the Frobenius inner product with (h_i - h_j) h_k^T."""
    rows = [np.outer(E[i] - E[j], E[k]).ravel() for i, j in pairs]
    return np.array(rows).reshape(len(pairs), E.shape[1] ** 2)


def graph_svm(graphs, E):
    """W_svm = argmin ||W||_F s.t. (h_i - h_j)^T W h_k = 0 for i ≍ j and >= 1 for i ⇒ j in
    every G^(k) (Eq. 1.26-1.28 for G_a, Eq. 1.29-1.31 for G_m). A convex QP (min ||W||_F^2 has
    the same argmin), solved with cvxpy. Always feasible: with linearly independent embeddings
    each W h_k can realise any scores, e.g. the topological level of each SCC."""
    d = E.shape[1]
    w = cp.Variable(d * d)
    constraints = []
    for k, G in graphs.items():
        equal, strict = priority_pairs(G)
        if equal:
            constraints.append(constraint_rows(E, k, equal) @ w == 0)
        if strict:
            constraints.append(constraint_rows(E, k, strict) @ w >= 1)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(w)), constraints)
    problem.solve(**SOLVER)
    if problem.status != cp.OPTIMAL:
        raise RuntimeError(f"Graph-SVM solver returned status {problem.status}")
    return w.value.reshape(d, d)


def cyclic_basis(graphs, E):
    """Orthonormal basis (columns, in vec(W) space) of the cyclic subspace
    S_fin = span{(h_i - h_j) h_k^T : i ≍ j in G^(k)}. W_svm is orthogonal to it by Eq. 1.27."""
    rows = [constraint_rows(E, k, priority_pairs(G)[0]) for k, G in graphs.items()]
    rows = np.concatenate(rows)
    return orth(rows.T) if len(rows) else np.zeros((E.shape[1] ** 2, 0))


def cyclic_component(graphs, E, X, y):
    """W_fin of [33]: once W_svm has pushed all lower-priority tokens to zero attention, what is
    left of the loss is softmax competition among the tokens of each sequence that share the
    label's SCC ("soft composition"). W_fin minimises that restricted loss over S_fin:

        l_i = -log( m_y e^{z_y} / sum_{j in O_i} m_j e^{z_j} ),   z_j = h_j^T W h_k,

    with O_i the distinct tokens of X_i in the label's SCC of G^(k) and m_j their counts.
    Convex (log-sum-exp minus a linear term) with a finite minimiser because every SCC is a cycle
    of labels; solved with cvxpy. Unique: the loss is strictly convex in the score differences of
    co-occurring SCC tokens, and those determine W on S_fin."""
    d = E.shape[1]
    basis = cyclic_basis(graphs, E)
    if basis.shape[1] == 0:
        return np.zeros((d, d))
    c = cp.Variable(basis.shape[1])
    terms = []
    for x, label in zip(X, y):
        k = int(x[-1])
        scc = next(set(m) for m in sccs(graphs[k]) if int(label) in m)
        tokens, counts = np.unique(x, return_counts=True)
        keep = np.isin(tokens, list(scc))
        if keep.sum() < 2:
            continue  # the label is retrieved alone: this sample's loss -> 0 along W_svm
        tokens, counts = tokens[keep], counts[keep]
        z = np.array([np.outer(E[t], E[k]).ravel() for t in tokens]) @ basis @ c  # h_t^T W h_k
        target = int(np.flatnonzero(tokens == label)[0])
        terms.append(cp.log_sum_exp(z + np.log(counts)) - z[target] - np.log(counts[target]))
    if not terms:
        return np.zeros((d, d))
    problem = cp.Problem(cp.Minimize(cp.sum(cp.hstack(terms)) / len(X)))
    problem.solve(**SOLVER)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise RuntimeError(f"cyclic-component solver returned status {problem.status}")
    return (basis @ c.value).reshape(d, d)


# ----------------------------------------------------------------------------------------------
# Eq. 1.34-1.35 Normalized gradient descent and correlation with the Graph-SVM direction
# ----------------------------------------------------------------------------------------------


def correlation(A, B):
    """Eq. 1.35: cosine between two matrices in the Frobenius inner product."""
    return float(np.sum(A * B) / (np.linalg.norm(A) * np.linalg.norm(B)))


def train(W0, E, C, X, y, W_svm, W_fin, steps, lr):
    """W(t+1) = W(t) - eta grad / ||grad||_F (Eq. 1.34), recording at every t
    - Eq. 1.35: corr(W(t), W_svm), the thesis's measure of Thm 1;
    - corr(W(t), R(t) W_svm/||W_svm|| + W_fin) with R(t) = <W(t), W_svm/||W_svm||>: the
      directional-plus-finite prediction of [33], which also accounts for the cyclic part."""
    direction = W_svm / np.linalg.norm(W_svm)
    W = W0.copy()
    corr_svm, corr_svm_fin, losses = (np.empty(steps + 1) for _ in range(3))
    for t in range(steps + 1):
        loss, grad = loss_and_grad(W, E, C, X, y)
        corr_svm[t] = correlation(W, W_svm)
        corr_svm_fin[t] = correlation(W, np.sum(W * direction) * direction + W_fin)
        losses[t] = loss
        norm = np.linalg.norm(grad)
        # norm == 0 only once every non-target attention has underflowed to exactly 0: the loss
        # is at its floating-point minimum and Eq. 1.34 would divide 0 by 0, so W stays.
        if t < steps and norm > 0:
            W = W - lr * grad / norm
    return W, dict(corr_svm=corr_svm, corr_svm_fin=corr_svm_fin, loss=losses)


# ----------------------------------------------------------------------------------------------
# What the trained attention looks like (Fig. 1.6c-d) and how the graphs differ (§1.6.3)
# ----------------------------------------------------------------------------------------------


def modality_mass(att, X):
    """Per-sample attention mass on state tokens and on action tokens."""
    on_state = is_state(X)
    return (att * on_state).sum(axis=1), (att * ~on_state).sum(axis=1)


def within_modality_selectivity(att, X, state_modality: bool):
    """Mean over samples of (largest attention on one distinct token of the modality) /
    (attention on the whole modality): 1 = the modality's share goes to a single token.
    Quantifies Fig. 1.6d's "more selective attention within each modality"."""
    values = []
    for a_i, x in zip(att, X):
        tokens = np.unique(x[is_state(x) == state_modality])
        shares = np.array([a_i[x == t].sum() for t in tokens])
        values.append(shares.max() / shares.sum())
    return float(np.mean(values))


def graph_statistics(graphs_a, graphs_m):
    """Counts behind the §1.6.3 claims about G_a and G_m (pairs of nodes of the same G^(k))."""
    stats = dict(
        state_reaches_action_a=0,
        cross_modal_sccs_a=0,
        action_state_pairs_a=0,
        action_over_state_a=0,
        graphs_m=len(graphs_m),
        graphs_m_with_cross_scc=0,
        a_over_s_to_equal=0,
        a_over_s_to_reversed=0,
        a_over_s_kept=0,
    )
    for k, Ga in graphs_a.items():
        nodes = list(Ga.nodes)
        pairs = [(i, j) for i in nodes if not is_state(i) for j in nodes if is_state(j)]
        stats["state_reaches_action_a"] += sum(nx.has_path(Ga, j, i) for i, j in pairs)
        stats["cross_modal_sccs_a"] += sum(len(set(is_state(c))) == 2 for c in sccs(Ga))
        _, strict_a = priority_pairs(Ga)
        a_over_s = [(i, j) for i, j in strict_a if not is_state(i) and is_state(j)]
        stats["action_state_pairs_a"] += len(pairs)
        stats["action_over_state_a"] += len(a_over_s)
        equal_m, strict_m = map(set, priority_pairs(graphs_m[k]))
        for i, j in a_over_s:
            if (min(i, j), max(i, j)) in equal_m:
                stats["a_over_s_to_equal"] += 1
            elif (j, i) in strict_m:
                stats["a_over_s_to_reversed"] += 1
            else:
                stats["a_over_s_kept"] += 1
    # G_a is a subgraph of G_m (the doubled dataset keeps every (X_i, a_i)), so an a => s pair of
    # G_a can never be reversed in G_m; a state can only out-rank an action it was unordered with.
    stats["state_over_action_m"] = sum(
        is_state(i) and not is_state(j) for G in graphs_m.values() for i, j in priority_pairs(G)[1]
    )
    stats["graphs_m_with_cross_scc"] = sum(
        any(len(set(is_state(c))) == 2 for c in sccs(G)) for G in graphs_m.values()
    )
    return {key: int(value) for key, value in stats.items()}


# ----------------------------------------------------------------------------------------------
# One trial of §1.6.5
# ----------------------------------------------------------------------------------------------

MODELS = {"action_only": False, "multi_task": True}  # name -> multi_task (Eq. 1.23 vs Eq. 1.25)


def run_trial(seed: int, args: Args):
    rng = np.random.default_rng(seed)
    states, actions = vocabulary(args.n_state_tokens, args.n_action_tokens)
    E = make_embeddings(rng, len(states) + len(actions), args.d_in)
    C = prediction_heads(E)
    # If every pair of some loss's graphs shares an SCC, its W_svm = 0 and Eq. 1.35 is undefined:
    # such data carry no directional bias to test, so we redraw them and report how often.
    for redraws in range(args.max_redraws + 1):
        X = make_sequences(rng, args.n_samples, args.seq_len, states, actions)
        a, s = make_labels(rng, X)
        models = {}
        for name, multi in MODELS.items():
            Xt, yt = task_dataset(X, a, s, multi)
            graphs = build_tpgs(Xt, yt)
            models[name] = dict(X=Xt, y=yt, graphs=graphs, W_svm=graph_svm(graphs, E))
        if all(np.linalg.norm(m["W_svm"]) > ZERO_TOL for m in models.values()):
            break
    else:
        raise SystemExit(
            f"error: trial with seed {seed} drew data whose Graph-SVM solution is zero "
            f"{args.max_redraws + 1} times; use more samples or raise --max-redraws"
        )
    # Both models start from the same W(0), so their differences come from the loss alone.
    W0 = args.init_std * rng.standard_normal((args.d_in, args.d_in))
    for m in models.values():
        m["W_fin"] = cyclic_component(m["graphs"], E, m["X"], m["y"])
        m["W"], m["history"] = train(
            W0, E, C, m["X"], m["y"], m["W_svm"], m["W_fin"], args.steps, args.lr
        )
        att = attention(m["W"], E, X)  # attention depends on the sequences only, not the labels
        state_mass, action_mass = modality_mass(att, X)
        m.update(
            attention=att,
            state_mass=float(state_mass.mean()),
            action_mass=float(action_mass.mean()),
            select_action=within_modality_selectivity(att, X, state_modality=False),
            select_state=within_modality_selectivity(att, X, state_modality=True),
        )
    stats = graph_statistics(models["action_only"]["graphs"], models["multi_task"]["graphs"])
    return dict(seed=seed, redraws=redraws, X=X, a=a, s=s, models=models, graph_stats=stats)


def trial_record(trial):
    """The JSON-serialisable part of a trial."""
    out = dict(
        seed=trial["seed"],
        redraws=trial["redraws"],
        sequences=trial["X"].tolist(),
        action_labels=trial["a"].tolist(),
        state_labels=trial["s"].tolist(),
        graph_stats=trial["graph_stats"],
    )
    for name, m in trial["models"].items():
        out[name] = dict(
            tpgs={
                token_name(k): dict(
                    edges=[[token_name(i), token_name(j)] for i, j in G.edges],
                    sccs=[[token_name(t) for t in c] for c in sccs(G)],
                )
                for k, G in m["graphs"].items()
            },
            norm_W_svm=float(np.linalg.norm(m["W_svm"])),
            norm_W_fin=float(np.linalg.norm(m["W_fin"])),
            norm_W_final=float(np.linalg.norm(m["W"])),
            final_corr_svm=float(m["history"]["corr_svm"][-1]),
            final_corr_svm_fin=float(m["history"]["corr_svm_fin"][-1]),
            final_loss=float(m["history"]["loss"][-1]),
            state_mass=m["state_mass"],
            action_mass=m["action_mass"],
            selectivity_action=m["select_action"],
            selectivity_state=m["select_state"],
        )
    return out


# ----------------------------------------------------------------------------------------------
# Claims and figures: thesis claim | our measurement | verdict. Each claim's check is one
# function that returns its row, beside the figure that shows what it measures.
# ----------------------------------------------------------------------------------------------


def mean_std(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def level(ok_full: bool, ok_some: bool) -> str:
    return "reproduced" if ok_full else ("partly" if ok_some else "not reproduced")


def corr_verdict(values):
    return level(np.mean(values) >= CORR_REPRODUCED, np.mean(values) >= CORR_PARTLY)


def pyplot():
    """matplotlib, imported when a figure is drawn (not when this file is imported), with a
    file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Fig. 1.5: the token-priority graphs and their SCCs (§1.6.3). `g` sums graph_statistics over
# the trials, `n` is the number of trials.


def claim_ga_no_state_to_action(g, n):
    return dict(
        claim="§1.6.3 G_a: no path from a state to an action token; SCCs only inside A",
        ours=f"{g['state_reaches_action_a']} state->action paths, {g['cross_modal_sccs_a']} "
        f"cross-modal SCCs in {n} trials (structural: states are never labels)",
        verdict=level(g["state_reaches_action_a"] == 0 and g["cross_modal_sccs_a"] == 0, False),
    )


def claim_ga_actions_over_states(g):
    above, pairs = g["action_over_state_a"], g["action_state_pairs_a"]
    return dict(
        claim="§1.6.3 G_a: (i => j) for ALL i in A, j in S",
        ours=f"{above}/{pairs} = {above / pairs:.0%} of (action, state) node "
        "pairs; an action that is never a label out-ranks nothing",
        verdict=level(above == pairs, above > 0),
    )


def claim_gm_cross_modal_scc(g):
    return dict(
        claim="§1.6.3 G_m: SCCs spanning both modalities can exist",
        ours=f"{g['graphs_m_with_cross_scc']}/{g['graphs_m']} graphs G_m^(k) have one "
        "(guaranteed: a_i -> s_i and s_i -> a_i for every sample)",
        verdict=level(g["graphs_m_with_cross_scc"] > 0, False),
    )


def claim_gm_equalities(g):
    """The thesis's "reversed" is its own gloss, "when some states get higher priority compared to
    actions": a state => action pair of G_m. An a => s pair of G_a itself cannot flip (G_a is a
    subgraph of G_m)."""
    turned = g["a_over_s_to_equal"] + g["a_over_s_to_reversed"]
    return dict(
        claim="§1.6.3 G_m: many action=>state inequalities become equalities, or are reversed "
        "when some states get higher priority than actions",
        ours=f"of {g['action_over_state_a']} a=>s pairs of G_a: {g['a_over_s_to_equal']} become "
        f"equal, {g['a_over_s_kept']} kept ({g['a_over_s_to_reversed']} flipped: impossible, G_a "
        f"is a subgraph of G_m); {g['state_over_action_m']} s=>a pairs in G_m (states "
        "out-ranking actions)",
        verdict=level(
            turned >= 0.5 * g["action_over_state_a"] and g["state_over_action_m"] > 0,
            turned > 0 or g["state_over_action_m"] > 0,
        ),
    )


def plot_tpgs(trial, vocab_size, path):
    """Fig. 1.5 (b)-(c) for one trial: every G^(k) of both losses. Tokens of a multi-token SCC
    share a colour (singletons are grey); squares = states, circles = actions; edges inside an SCC
    are black, priority edges between SCCs grey."""
    plt = pyplot()
    queries = list(trial["models"]["action_only"]["graphs"])
    fig, axes = plt.subplots(2, len(queries), figsize=(3.6 * len(queries), 7.2), squeeze=False)
    pos = nx.circular_layout(range(vocab_size))
    for row, (name, m) in enumerate(trial["models"].items()):
        for col, k in enumerate(queries):
            G, ax = m["graphs"][k], axes[row, col]
            component = {t: c for c, members in enumerate(sccs(G)) for t in members}
            cyclic = [c for c in sccs(G) if len(c) > 1]
            color = {t: plt.cm.tab10(n % 10) for n, c in enumerate(cyclic) for t in c}
            for shape, want_state in (("s", True), ("o", False)):
                nodes = [t for t in G.nodes if is_state(t) == want_state]
                nx.draw_networkx_nodes(
                    G,
                    pos,
                    nodelist=nodes,
                    node_shape=shape,
                    node_size=600,
                    ax=ax,
                    node_color=[color.get(t, "0.85") for t in nodes],
                    edgecolors="k",
                )
            inside = [(i, j) for i, j in G.edges if component[i] == component[j]]
            across = [(i, j) for i, j in G.edges if component[i] != component[j]]
            for edges, edge_color in ((across, "0.6"), (inside, "k")):
                nx.draw_networkx_edges(
                    G,
                    pos,
                    edgelist=edges,
                    edge_color=edge_color,
                    ax=ax,
                    node_size=600,
                    arrowsize=14,
                    connectionstyle="arc3,rad=0.12",
                )
            nx.draw_networkx_labels(
                G, pos, {t: token_name(t) for t in G.nodes}, ax=ax, font_size=10
            )
            graph = "G_a" if name == "action_only" else "G_m"
            names = " ".join("{" + ",".join(token_name(t) for t in c) + "}" for c in cyclic)
            ax.set_title(
                f"${graph}^{{({token_name(k)})}}$  SCCs: {names or 'singletons only'}", fontsize=10
            )
            ax.set(xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), aspect="equal")
            ax.axis("off")
    fig.suptitle(
        f"Fig. 1.5: token-priority graphs per query token, trial seed {trial['seed']} "
        "(top: action-only G_a, bottom: multi-task G_m)\ncolour = multi-token SCC, "
        "square = state, circle = action, black edge = inside an SCC"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Fig. 1.6a-b: Thm 1, the direction W(t) converges to (Eq. 1.35). `ao` and `mt` map each
# trial_record key to its values over the trials, for the action-only and multi-task models.


def claim_thm1a(ao, steps, n):
    return dict(
        claim="Thm 1(a), §1.6.5: action-only W(t) aligns with W_a; corr ≈ 0.98 (Eq. 1.35)",
        ours=f"corr(W({steps}), W_a) = {mean_std(ao['final_corr_svm'])} "
        f"(min {min(ao['final_corr_svm']):.3f}, {n} trials)",
        verdict=corr_verdict(ao["final_corr_svm"]),
    )


def claim_thm1b(mt, steps):
    return dict(
        claim="Thm 1(b), §1.6.5: multi-task W(t) aligns with W_m (Eq. 1.35)",
        ours=f"corr(W({steps}), W_m) = {mean_std(mt['final_corr_svm'])} "
        f"(min {min(mt['final_corr_svm']):.3f})",
        verdict=corr_verdict(mt["final_corr_svm"]),
    )


def claim_svm_plus_fin(ao, mt):
    worst = min(np.mean(ao["final_corr_svm_fin"]), np.mean(mt["final_corr_svm_fin"]))
    return dict(
        claim="[33] (source, not thesis): W(t) ≈ R(t) W_svm/||W_svm|| + W_fin",
        ours=f"corr: action-only {mean_std(ao['final_corr_svm_fin'])}, "
        f"multi-task {mean_std(mt['final_corr_svm_fin'])}; "
        f"||W_fin|| {mean_std(ao['norm_W_fin'])} vs {mean_std(mt['norm_W_fin'])}",
        verdict=level(worst >= CORR_REPRODUCED, worst >= CORR_PARTLY),
    )


def plot_fig_1_6(trials, shown, path):
    """Fig. 1.6: (a)-(b) Eq. 1.35 over training, mean ± std over trials; (c)-(d) attention of the
    final token over the positions of each training sequence (one trial)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for col, name in enumerate(MODELS):
        ax = axes[0, col]
        # dashed on top: when W_fin ≈ 0 (typical for action-only) the two curves coincide
        for key, label, style in (
            ("corr_svm", "corr(W(t), W_svm)  (Eq. 1.35)", "-"),
            ("corr_svm_fin", "corr(W(t), R W_svm/|W_svm| + W_fin)  [33]", "--"),
        ):
            curves = np.array([t["models"][name]["history"][key] for t in trials])
            mean, std = curves.mean(axis=0), curves.std(axis=0)
            steps = np.arange(len(mean))
            ax.plot(steps, mean, style, label=label)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
        ax.set(
            xlabel="iteration t",
            ylabel="correlation",
            ylim=(min(0.0, ax.get_ylim()[0]), 1.02),
            title=f"({'ab'[col]}) {name.replace('_', '-')}: {len(trials)} trials, mean ± std",
        )
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        m, X = shown["models"][name], shown["X"]
        ax = axes[1, col]
        im = ax.imshow(m["attention"], cmap="viridis", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(m["attention"]):
            ax.text(
                j,
                i,
                f"{token_name(X[i, j])}\n{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="w" if value < 0.6 else "k",
            )
        ax.set_xticks(
            range(X.shape[1]), [f"{j} ({'s' if j % 2 == 0 else 'a'})" for j in range(X.shape[1])]
        )
        ax.set_yticks(range(len(X)))
        ax.set(
            xlabel="position (even = state, odd = action)",
            ylabel="training sequence i",
            title=f"({'cd'[col]}) {name.replace('_', '-')}, seed {shown['seed']}: "
            f"state mass {m['state_mass']:.3f}",
        )
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Fig. 1.6c-d and attention_mass.png: where the trained attention goes.


def claim_action_only_ignores_states(ao):
    mass = np.mean(ao["state_mass"])
    return dict(
        claim="Fig. 1.6c: action-only model pays negligible attention to state tokens",
        ours=f"attention mass on states {mean_std(ao['state_mass'])} (threshold {NEGLIGIBLE_MASS})",
        verdict=level(mass < NEGLIGIBLE_MASS, mass < 0.5),
    )


def claim_multi_task_balanced(mt):
    return dict(
        claim="Fig. 1.6d: multi-task attention balanced across modalities",
        ours=f"attention mass on states {mean_std(mt['state_mass'])}; ≈ 1/2 is forced by the "
        "loss (-log p_a - log p_s with p_a + p_s <= 1 peaks at p_a = p_s = 1/2)",
        verdict=level(BALANCED_MASS[0] <= np.mean(mt["state_mass"]) <= BALANCED_MASS[1], False),
    )


def claim_multi_task_more_selective(ao, mt):
    keys = ("selectivity_action", "selectivity_state")
    more_selective = [np.mean(mt[k]) > np.mean(ao[k]) for k in keys]
    return dict(
        claim="Fig. 1.6d: multi-task attention more selective within each modality",
        ours=f"top-token share in actions: {mean_std(ao['selectivity_action'])} (action-only) vs "
        f"{mean_std(mt['selectivity_action'])} (multi-task); in states: "
        f"{mean_std(ao['selectivity_state'])} vs {mean_std(mt['selectivity_state'])}",
        verdict=level(all(more_selective), any(more_selective)),
    )


def plot_attention_mass(records, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    modalities = (("state_mass", "state tokens"), ("action_mass", "action tokens"))
    for offset, (key, label) in enumerate(modalities):
        values = [[r[name][key] for r in records] for name in MODELS]
        ax.bar(
            np.arange(len(MODELS)) + 0.35 * offset,
            [np.mean(v) for v in values],
            width=0.35,
            yerr=[np.std(v) for v in values],
            capsize=4,
            label=label,
        )
    ax.set_xticks(np.arange(len(MODELS)) + 0.175, [n.replace("_", "-") for n in MODELS])
    ax.set(
        ylabel="attention mass of the final token",
        ylim=(0, 1.05),
        title=f"Attention per modality ({len(records)} trials)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def claims_table(records, steps):
    """Every §1.6 claim we test, in the printed order, from the trials' JSON records."""
    n = len(records)
    g = {key: sum(r["graph_stats"][key] for r in records) for key in records[0]["graph_stats"]}
    final = {
        name: {key: [r[name][key] for r in records] for key in records[0][name] if key != "tpgs"}
        for name in MODELS
    }
    ao, mt = final["action_only"], final["multi_task"]
    return [
        claim_ga_no_state_to_action(g, n),
        claim_ga_actions_over_states(g),
        claim_gm_cross_modal_scc(g),
        claim_gm_equalities(g),
        claim_thm1a(ao, steps, n),
        claim_thm1b(mt, steps),
        claim_svm_plus_fin(ao, mt),
        claim_action_only_ignores_states(ao),
        claim_multi_task_balanced(mt),
        claim_multi_task_more_selective(ao, mt),
    ]


def format_table(rows):
    lines = ["| thesis claim | ours | verdict |", "|---|---|---|"]
    lines += [f"| {r['claim']} | {r['ours']} | {r['verdict']} |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

CHOICES = [
    "Orthogonal heads for ALL token pairs (C E^T = I), not only within a modality as "
    "Eq. 1.19-1.20 state: otherwise the score of Eq. 1.21 is not the attention on "
    "the target and [33] does not apply.",
    "One TPG per query (last) token, as in [33]; sample (X_i, y_i) adds y_i -> j for "
    "every other token j of X_i. Multi-task graphs are those of the doubled dataset "
    "{(X_i, a_i)} u {(X_i, s_i)} (Eq. 1.25).",
    "Data (not specified in §1.6.5): sequences laid out s, a, s, a (even ids = "
    "states, odd ids = actions, as in Fig. 1.6), tokens uniform within a modality; "
    "labels uniform over the sequence's distinct action / state tokens "
    "(realizability). Data whose Graph-SVM solution is 0 are redrawn.",
    "Embeddings: i.i.d. N(0, 1/d_in) entries (full row rank almost surely). W(0) ~ "
    "N(0, init_std^2) entries (init not given in the thesis); both models share the "
    "data and W(0) in a trial.",
    "Graph-SVM constraints over all i ≍ j and i => j pairs (Eq. 1.27-1.28); solved with "
    "cvxpy/Clarabel.",
    "Attention maps (Fig. 1.6c-d) = attention of the final token over the positions "
    "of each training sequence; the thesis does not say which map it shows.",
]


def validate(args: Args):
    vocab_size = args.n_state_tokens + args.n_action_tokens
    checks = [
        (
            0 <= args.seed and args.seed + args.trials <= 2**32,
            f"--seed ({args.seed}) must be in [0, 2**32 - --trials] (trial i uses seed + i)",
        ),
        (
            args.n_state_tokens >= 1 and args.n_action_tokens >= 1,
            "--n-state-tokens and --n-action-tokens must be >= 1",
        ),
        (
            args.d_in >= vocab_size,
            f"--d-in ({args.d_in}) must be >= |V| = {vocab_size} so the token "
            "embeddings have full row rank (technical condition 1)",
        ),
        (
            args.seq_len >= 2 and args.seq_len % 2 == 0,
            f"--seq-len ({args.seq_len}) must be even and >= 2 (sequences are s, a, s, a, ...)",
        ),
        (args.n_samples >= 1, "--n-samples must be >= 1"),
        (args.steps >= 1, "--steps must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
        (args.trials >= 1, "--trials must be >= 1"),
        (args.init_std > 0, "--init-std must be > 0 (Eq. 1.35 is undefined at W = 0)"),
        (args.max_redraws >= 0, "--max-redraws must be >= 0"),
        (
            0 <= args.heatmap_trial < args.trials,
            f"--heatmap-trial must be in [0, {args.trials - 1}] (one of the --trials)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")


def prepare_out_dir(args: Args) -> str:
    """Checked before the work, made at the first write (common.output_folder's rule): a refused or
    failed run leaves no folder behind."""
    return str(
        common.output_folder(args.out_dir, f"theory_tpg__{args.seed}", args.force, "--out-dir")
    )


def git_commit():
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except Exception:
        return None


def draw_figures(args: Args, out_dir: str, trials, records) -> None:
    """Fig. 1.5 and Fig. 1.6 (of the --heatmap-trial), and the attention mass of every trial."""
    vocab_size = args.n_state_tokens + args.n_action_tokens
    os.makedirs(out_dir, exist_ok=True)
    shown = trials[args.heatmap_trial]
    plot_tpgs(shown, vocab_size, os.path.join(out_dir, "fig1_5_tpgs.png"))
    plot_fig_1_6(trials, shown, os.path.join(out_dir, "fig1_6.png"))
    plot_attention_mass(records, os.path.join(out_dir, "attention_mass.png"))


def mean_curves(trials, steps):
    """Eq. 1.35 over training, averaged over the trials, at most ~200 points per curve."""
    every = max(1, steps // 200)
    curves = {}
    for name in MODELS:
        curves[name] = {}
        for key in ("corr_svm", "corr_svm_fin"):
            mean = np.mean([t["models"][name]["history"][key] for t in trials], axis=0)
            curves[name][key] = mean[::every].tolist()
    return curves


def write_summary(args: Args, out_dir: str, trials, records, table, start: float) -> dict:
    summary = dict(
        config=asdict(args),
        out_dir=out_dir,
        git_commit=git_commit(),
        device=f"CPU, numpy ({platform.machine()}, {os.cpu_count()} cores)",
        interpretation_choices=CHOICES,
        verdict_thresholds=dict(
            corr_reproduced=CORR_REPRODUCED,
            corr_partly=CORR_PARTLY,
            negligible_mass=NEGLIGIBLE_MASS,
            balanced_mass=BALANCED_MASS,
        ),
        claims=table,
        trials=records,
        curves=mean_curves(trials, args.steps),
        wall_time_s=time.time() - start,
    )
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(args: Args) -> dict:
    start = time.time()
    validate(args)
    out_dir = prepare_out_dir(args)
    # Each trial draws from its own np.random.default_rng(seed + i); torch is not used (the
    # gradient of Eq. 1.23 is in closed form), so there is no torch state to seed.
    random.seed(args.seed)
    np.random.seed(args.seed)
    print("Interpretation choices (thesis §1.6 leaves these open):")
    for choice in CHOICES:
        print(f"  - {choice}")

    trials = [run_trial(args.seed + i, args) for i in tqdm(range(args.trials), desc="trials")]
    records = [trial_record(t) for t in trials]
    table = claims_table(records, args.steps)
    draw_figures(args, out_dir, trials, records)
    summary = write_summary(args, out_dir, trials, records, table, start)
    print(format_table(table))
    print(
        f"wrote {out_dir}/ (fig1_5_tpgs.png, fig1_6.png, attention_mass.png, summary.json) "
        f"in {summary['wall_time_s']:.1f} s"
    )
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
