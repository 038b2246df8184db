import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tt

ROOT = Path(__file__).resolve().parents[1]


def tiny_args(tmp_path, hdf5_path, **kw):
    base = {
        "env": "hopper-random",
        "dataset_path": (str(hdf5_path),),
        "n_bins": 20,
        "seq_len": 3,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "batch_size": 8,
        "updates": 6,
        "warmup_epochs": 0.01,
        "decay_epochs": 1.0,
        "horizon": 2,
        "beam_width": 3,
        "max_context": 2,
        "eval_episodes": 2,
        "eval_max_steps": 8,
        "runs_dir": str(tmp_path / "runs"),
        "log_every": 2,
    }
    return tt.Args(**{**base, **kw})


def tiny_model(obs_dim=2, act_dim=1, n_bins=7, seq_len=3, seed=0):
    torch.manual_seed(seed)
    return tt.TrajectoryTransformer(
        obs_dim, act_dim, n_bins, seq_len, n_layer=2, n_head=2, n_embd=16, dropout=0.0
    ).eval()


# --- data -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["quantile", "uniform"])
def test_discretizer_round_trip_and_edge_values(kind):
    rng = np.random.default_rng(0)
    x = np.column_stack(
        [rng.normal(size=5000), rng.exponential(size=5000), rng.integers(0, 3, 5000)]
    )  # col 2: ties
    d = tt.Discretizer.fit(x, 10, kind, "cpu")
    assert d.edges.shape == (11, 3)
    if kind == "quantile":  # equal mass per bin where values are continuous
        counts = np.bincount(d.encode(torch.as_tensor(x))[:, 0].numpy(), minlength=10)
        assert counts.min() >= 450 and counts.max() <= 550
    else:
        np.testing.assert_allclose(
            np.diff(d.edges.numpy(), axis=0), np.ptp(x, axis=0)[None].repeat(10, 0) / 10
        )
    # value -> bin -> midpoint: off by at most its bin's width, and the midpoint encodes to the same
    # bin
    idx = d.encode(torch.as_tensor(x))
    rec = d.decode(idx).double()
    width = (d.edges[1:] - d.edges[:-1]).gather(0, idx)
    assert ((rec - torch.as_tensor(x)).abs() <= width / 2 + 1e-6).all()
    assert (d.encode(rec) == idx).all()
    # every non-empty bin decodes and encodes back to itself; empty bins (ties in col 2) are never
    # produced
    bins = torch.arange(10)[:, None].expand(10, 3)
    nonempty = d.edges[1:] > d.edges[:-1]
    assert (d.encode(d.decode(bins))[nonempty] == bins[nonempty]).all()
    assert set(idx[:, 2].tolist()) <= set(torch.nonzero(nonempty[:, 2]).flatten().tolist()) | {9}
    # edges: min -> first bin, max -> last bin, outside the data range -> the end bins
    lo, hi = torch.as_tensor(x.min(0)), torch.as_tensor(x.max(0))
    assert d.encode(lo)[:2].tolist() == [0, 0] and d.encode(hi).tolist() == [9, 9, 9]
    assert d.encode(lo - 100).tolist() == [0, 0, 0] and d.encode(hi + 100).tolist() == [9, 9, 9]
    assert d.encode(hi[1:2], dims=slice(1, 2)).tolist() == [9]  # a slice of the dimensions


def test_value_targets_and_terminal_penalty():
    np.testing.assert_allclose(
        tt.value_targets(np.array([1.0, 2.0, 3.0]), 0.5), [2 + 0.5 * 3, 3, 0]
    )
    eps = [{"observations": np.zeros((3, 1), np.float32), "actions": np.zeros((3, 1), np.float32),
                "rewards": np.array([1, 2, 3], np.float32), "terminated": True}]  # fmt: skip
    data = tt.make_dataset(eps, torch.device("cpu"), 200, "uniform", 0.5, -100.0)
    r = data["disc"].decode(data["tokens"])[:, 2]
    v = data["disc"].decode(data["tokens"])[:, 3]
    # the last reward is replaced, not added to
    np.testing.assert_allclose(r, [1, 2, -100], atol=102 / 400)
    np.testing.assert_allclose(v, [2 + 0.5 * -100, -100, 0], atol=100 / 400)


def test_token_layout_and_windows():
    """Transition = s^1..s^m_s, a^1..a^m_a, r, V; windows are consecutive transitions of one episode
    and run into stop tokens (index N) past the episode's end; targets are the inputs shifted by one
    token."""
    eps = []
    for i, n in enumerate((4, 6)):
        t = np.arange(n, dtype=np.float32)[:, None] + 100 * i
        eps.append(
            {
                "observations": np.hstack([t, -t]),
                "actions": t / 1000,
                "rewards": t[:, 0],
                "terminated": False,
            }
        )
    data = tt.make_dataset(eps, torch.device("cpu"), 16, "quantile", 0.99, -100.0)
    assert data["tokens"].shape == (10, 2 + 1 + 2)
    assert data["starts"].tolist() == [0, 1, 2, 4, 5, 6, 7, 8]  # every step but an episode's last
    x, y = tt.sample_batch(data, 200, 3, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (200, 3 * 5 - 1)
    full = torch.cat([x, y[:, -1:]], 1).view(200, 3, 5)
    assert (y == torch.cat([x[:, 1:], y[:, -1:]], 1)).all()
    decoded_t = data["disc"].decode(full[:, 0, :1], dims=slice(0, 1))[:, 0]
    for i in range(200):
        s = int(
            torch.nonzero(
                data["disc"].decode(data["tokens"][:, :1], dims=slice(0, 1))[:, 0] == decoded_t[i]
            )[0]
        )
        end = 4 if s < 4 else 10
        for k in range(3):
            if s + k < end:
                assert full[i, k].tolist() == data["tokens"][s + k].tolist()
            else:
                assert (full[i, k] == 16).all()  # stop tokens
    assert (full == 16).any()  # windows that start near an episode's end were drawn


# --- model ----------------------------------------------------------------------------------------


def test_causality_and_hidden_value_tokens():
    model = tiny_model()
    n_tok, T = model.transition_dim, model.block_size
    x = torch.randint(0, 7, (1, T), generator=torch.Generator().manual_seed(1))
    base = model(x)[0]
    for j in (0, 3, 4, 7, 9, 12):  # 5 tokens per transition: positions 4 and 9 hold values
        x2 = x.clone()
        x2[0, j] = (x2[0, j] + 3) % 7
        out = model(x2)[0]
        # the future never leaks back
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        # the token itself matters for its own prediction
        assert not torch.allclose(out[:, j], base[:, j])
        later = (out[:, j + 1 :] - base[:, j + 1 :]).abs().amax().item()
        if j % n_tok == n_tok - 1:
            assert later < 1e-6  # no token reads a value token (TT code's mask)
        else:
            assert later > 1e-4


def test_kv_cache_equals_uncached_forward_across_crops():
    model = tiny_model(seq_len=3)
    # 5 tokens per transition, view of at most 14 tokens
    n_tok, mb = model.transition_dim, model.block_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 7, (3, 7), generator=g)
    cached, plain = tt.Sequences(model, prefix, mb, True), tt.Sequences(model, prefix, mb, False)
    with torch.no_grad():
        for step in range(25):
            # single tokens and pairs
            new = torch.randint(0, 7, (3, 1 + (step % 4 == 0)), generator=g)
            if step == 10:  # beams are reordered and copied as in beam search
                rows = torch.tensor([2, 2, 0])
                cached.select(rows), plain.select(rows)
            cached.append(new), plain.append(new)
            L = cached.x.shape[1]
            # the TT code's crop: whole transitions, oldest first
            lo = math.ceil(max(0, L - mb) / n_tok) * n_tok
            reference = model(cached.x[:, lo:])[0][:, -1, :7]
            torch.testing.assert_close(cached.logits, reference, rtol=0, atol=1e-5)
            torch.testing.assert_close(plain.logits, reference, rtol=0, atol=1e-5)
            assert cached.lo == plain.lo == lo and cached.x.shape[1] - cached.lo <= mb


def test_loss_weighting_hand_computed():
    # 4 tokens per transition: s, a, r, V; 2 classes (bin, stop)
    model = tiny_model(obs_dim=1, act_dim=1, n_bins=1, seq_len=2)
    w = tt.token_weights(model, 7, action_weight=5.0, reward_weight=2.0, value_weight=0.5)
    assert w.tolist() == [5, 2, 0.5, 1, 5, 2, 0.5]  # targets: a, r, V, s, a, r, V
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)]]])  # ce: ln 2, then -ln(3/4)
    loss = tt.tt_loss(logits, torch.tensor([[0, 1]]), torch.tensor([5.0, 2.0]))
    assert loss.item() == pytest.approx((5 * math.log(2) + 2 * math.log(4 / 3)) / 2)


# --- planning -------------------------------------------------------------------------------------


class HandModel(torch.nn.Module):
    """obs_dim = act_dim = 1, N = 4. Action a is drawn with probabilities ACT (most likely: 0); the
    reward and value tokens are certain and depend on (a + s) mod 4: r bins R, V bins VB. The cache
    holds the tokens."""

    ACT = torch.tensor([0.31, 0.23, 0.23, 0.23])
    R, VB = [2, 3, 0, 1], [0, 0, 1, 3]

    def __init__(self):
        super().__init__()
        self.obs_dim, self.act_dim, self.n_bins, self.transition_dim = 1, 1, 4, 4
        self.block_size = 4 * 10 - 1

    def forward(self, tokens, start=0, cache=None):
        seq = tokens if cache is None else torch.cat([cache[0][0], tokens], 1)
        out = torch.full((*tokens.shape, 5), -1e4)
        for p in range(start, seq.shape[1]):
            nxt, s0 = (p + 1) % 4, p - p % 4
            if nxt == 1:
                out[:, p - start, :4] = self.ACT.log()
            elif nxt in (2, 3):
                key = (seq[:, s0 + 1] + seq[:, s0]) % 4
                out[
                    torch.arange(len(seq)),
                    p - start,
                    torch.tensor(self.R if nxt == 2 else self.VB)[key],
                ] = 0.0
            else:
                out[:, p - start, 0] = 0.0
        return out, [(seq, seq)]


def hand_discretizer():
    edges = torch.tensor(
        [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [-0.5, 0.5, 1.5, 2.5, 3.5], [-1, 1, 3, 7, 13]]
    )
    return tt.Discretizer(edges.T.double())  # r midpoints 0, 1, 2, 3; V midpoints 0, 2, 5, 10


def test_beam_search_returns_the_best_scoring_plan_per_episode():
    """Score of a 1-step plan = r + gamma V. With s = 0: a=0 -> 2 + 0, a=1 -> 3 + 0, a=2 -> 0 +
    .99*2, a=3 -> 1 + .99*10 (best); greedy decoding takes the most likely action, 0. With s = 1
    everything shifts by one: the best action is 2. Two episodes planned in one batch must not
    mix."""
    model, disc = HandModel(), hand_discretizer()
    args = tt.Args(
        horizon=1, beam_width=4, n_expand=8, cdf_act=0.0, k_obs=1, max_context=5, updates=1
    )
    prefix = torch.tensor([[0], [1]])
    for seed in range(3):
        best = tt.plan(
            model, disc, prefix, tt.plan_settings(args), torch.Generator().manual_seed(seed)
        )
        assert best[:, 0].tolist() == [3, 2]
    greedy = tt.plan(
        model, disc, prefix, tt.plan_settings(tt.Args(beam_width=1, updates=1)), torch.Generator()
    )
    assert greedy[:, 0].tolist() == [0, 0]


def test_cdf_and_topk_filters():
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    kept = torch.isfinite(tt.filter_logits(logits, 0, 0.35))[0].tolist()
    assert kept == [False, False, True, True]  # 0.1 + 0.2 < 0.35 dropped, as in the TT code
    assert torch.isfinite(tt.filter_logits(logits, 1, 0.0))[0].tolist() == [
        False,
        False,
        False,
        True,
    ]
    # all equal: the TT rule would drop everything; the most likely tokens survive
    flat = torch.zeros(1, 4)
    assert torch.isfinite(tt.filter_logits(flat, 0, 0.6)).all()


# --- the script -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"beam_width": 0}, "--beam-width 0"),
        ({"n_embd": 30}, "--n-embd 30"),
        ({"cdf_act": 1.0}, "--cdf-act 1.0"),
        ({"max_context": 11}, "--max-context 11"),
        ({"updates": 0}, "--updates 0"),
        ({"discount": 0.0}, "--discount"),
        ({"decay_epochs": 0.5}, "--decay-epochs 0.5"),
        ({"n_bins": 0}, "--n-bins 0"),
        ({"n_bins": 1}, "--n-bins 1"),
        ({"eval_max_steps": 0}, "--eval-max-steps 0"),
        ({"max_context": 0}, "--max-context 0"),
    ],
)
def test_bad_flags_are_refused_with_one_message(kw, message):
    with pytest.raises(SystemExit, match=message.replace(".", r"\.")):
        tt.Args(**kw)


def test_track_without_wandb_is_refused(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else find_spec(name, *a),
    )
    with pytest.raises(SystemExit, match="--track needs wandb"):
        tt.Args(track=True)


def test_bad_flag_on_the_command_line_is_one_line_without_traceback():
    p = subprocess.run(
        [sys.executable, "tt.py", "--horizon", "-1"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert (
        p.returncode != 0
        and "error: --horizon -1: must be > 0." in p.stderr
        and "Traceback" not in p.stderr
    )


def test_bad_checkpoints_and_device(tmp_path, hdf5_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint torch can read"):
        tt.train(tiny_args(tmp_path, hdf5_path, checkpoint=str(junk), updates=0))
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "method": "dt"}, other)  # e.g. a dt.py checkpoint
    with pytest.raises(SystemExit, match="written by dt, not tt.py"):
        tt.train(tiny_args(tmp_path, hdf5_path, checkpoint=str(other), updates=0))
    with pytest.raises(SystemExit, match="no such file"):
        tt.train(tiny_args(tmp_path, hdf5_path, checkpoint=str(tmp_path / "missing.pt"), updates=0))
    with pytest.raises(SystemExit, match="--device 'gpu7'"):
        tt.train(tiny_args(tmp_path, hdf5_path, device="gpu7"))
    assert not (tmp_path / "runs").exists()  # refused before a run folder was made


def test_end_to_end_checkpoint_and_determinism(tmp_path, hdf5_path):
    res = tt.train(tiny_args(tmp_path, hdf5_path))
    run = Path(res["run_dir"])
    for f in ("config.json", "metrics.jsonl", "results.json", "model.pt"):
        assert (run / f).is_file()
    saved = json.loads((run / "results.json").read_text())
    assert (
        saved["updates"] == 6
        and len(saved["returns"]) == 2
        and saved["dataset"]["source"] == "file"
    )
    assert all(1 <= n <= 8 for n in saved["lengths"]) and saved["plan_s_per_step"] > 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [0, 2, 4, 5] and "eval_normalized" in lines[
        -1
    ]
    assert all(math.isfinite(m["loss"]) for m in lines if "loss" in m)
    # same seed, same everything: losses and returns repeat exactly
    again = tt.train(tiny_args(tmp_path / "b", hdf5_path))
    again_lines = [
        json.loads(line)
        for line in (Path(again["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    assert again["returns"] == res["returns"] and [m for m in again_lines if "loss" in m] == [
        m for m in lines if "loss" in m
    ]
    # --updates 0 evaluates the checkpoint (its architecture, whatever the flags say) and reproduces
    # the score
    ev = tt.train(
        tiny_args(
            tmp_path / "c",
            hdf5_path,
            checkpoint=str(run / "model.pt"),
            updates=0,
            n_layer=5,
            n_embd=64,
            n_bins=50,
        )
    )
    assert (
        ev["returns"] == res["returns"]
        and ev["args"]["n_layer"] == 2
        and ev["args"]["n_bins"] == 20
    )
    assert not (Path(ev["run_dir"]) / "model.pt").exists()
    # without --env, the checkpoint is evaluated on its own dataset; --updates N trains on with its
    # bins
    own = tt.train(
        tt.Args(
            checkpoint=str(run / "model.pt"),
            updates=0,
            horizon=2,
            beam_width=3,
            max_context=2,
            eval_episodes=2,
            eval_max_steps=8,
            runs_dir=str(tmp_path / "e"),
        )
    )
    assert own["returns"] == res["returns"] and own["dataset"]["name"] == "hopper-random"
    more = tt.train(
        tiny_args(tmp_path / "f", hdf5_path, checkpoint=str(run / "model.pt"), updates=2)
    )
    assert more["trained_updates"] == 8 and torch.equal(
        torch.load(Path(more["run_dir"]) / "model.pt", weights_only=True)["edges"],
        torch.load(run / "model.pt", weights_only=True)["edges"],
    )
    greedy = tt.train(
        tiny_args(
            tmp_path / "d", hdf5_path, checkpoint=str(run / "model.pt"), updates=0, beam_width=1
        )
    )
    assert (
        len(greedy["returns"]) == 2
        and greedy["args"]["beam_width"] == 1
        and greedy["plan_s_per_step"] > 0
    )


# --- evaluating a checkpoint (issue 25, item 3) ---------------------------------------------------


def test_evaluating_a_checkpoint_takes_its_context_and_names_the_run(tmp_path, hdf5_path, capsys):
    """`--checkpoint CK --updates 0` alone: the planner's context comes from the checkpoint's window
    (seq_len 3, shorter than the TT code's 5 transitions) instead of failing; the run is named -eval
    and the cost of planning is printed before the wait."""
    ck = Path(tt.train(tiny_args(tmp_path / "a", hdf5_path))["run_dir"]) / "model.pt"  # seq_len 3
    capsys.readouterr()
    ev = tt.train(
        tt.Args(
            checkpoint=str(ck),
            updates=0,
            horizon=2,
            beam_width=3,
            eval_episodes=2,
            eval_max_steps=8,
            runs_dir=str(tmp_path / "ev"),
        )
    )
    out = capsys.readouterr().out
    assert (
        ev["args"]["max_context"] == 3
        and "capped at the checkpoint's --seq-len 3" in ev["sources"]["max_context"]
    )
    assert "max_context 3 (TT base, capped at the checkpoint's --seq-len 3)" in out
    assert (
        "__tt-eval__" in Path(ev["run_dir"]).name
        and not (Path(ev["run_dir"]) / "model.pt").exists()
    )
    # before the wait
    assert out.index("planning: beam 3 x horizon 2: about ") < out.index("normalized score")
    with pytest.raises(
        SystemExit, match=r"--max-context 5: must be <= the checkpoint's --seq-len 3"
    ):
        tt.train(
            tt.Args(
                checkpoint=str(ck), updates=0, max_context=5, runs_dir=str(tmp_path / "refused")
            )
        )
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("beam_width", [1, 3])
def test_the_printed_planning_cost_counts_the_forward_passes(beam_width):
    model, calls = tiny_model(obs_dim=2, act_dim=2, seq_len=3), []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    args = tt.Args(horizon=2, beam_width=beam_width, n_expand=2, max_context=3, updates=1)
    disc = tt.Discretizer(torch.linspace(0, 1, 8)[:, None].repeat(1, 6).double())
    prefix = torch.zeros(2, 2 * 6 + 2, dtype=torch.long)
    tt.plan(model, disc, prefix, tt.plan_settings(args), torch.Generator().manual_seed(0))
    said = tt.planning_cost(args, 2, 2)
    assert f"about {len(calls)} forward passes" in said or f": {len(calls)} forward passes" in said


def test_evaluation_shows_plan_steps_episodes_and_env_steps(tmp_path, hdf5_path, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, *a, **kw):
            self.kw, self.n, self.postfix = kw, 0, {}
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix(self, refresh=True, **kw):
            self.postfix = kw

        def close(self):
            pass

        write = staticmethod(print)

    ck = Path(tt.train(tiny_args(tmp_path, hdf5_path))["run_dir"]) / "model.pt"
    monkeypatch.setattr(tt, "tqdm", Bar)
    res = tt.train(tiny_args(tmp_path / "ev", hdf5_path, checkpoint=str(ck), updates=0))
    (bar,) = bars
    assert bar.kw["desc"] == "evaluate" and bar.kw["total"] == 8 and bar.kw["unit"] == "plan step"
    assert bar.n == max(res["lengths"])  # one planning step per env step of the longest episode
    assert bar.postfix == {"episodes": "2/2", "env_steps": sum(res["lengths"])}


# --- the TT code's configuration per dataset (issue 27, item 1) and fp32 planning (issue 28, item 8


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "walker2d-medium-replay",
            dict(beam_width=32, horizon=20, k_act=40, cdf_act=0.0, n_epochs_ref=80),
        ),
        (
            "hopper-medium-replay",
            dict(beam_width=128, horizon=15, k_act=0, cdf_act=0.6, n_epochs_ref=80),
        ),
        (
            "halfcheetah-medium",
            dict(beam_width=32, horizon=5, k_act=0, cdf_act=0.6, n_epochs_ref=50),
        ),
        ("halfcheetah-medium-replay", dict(beam_width=32, horizon=5, n_epochs_ref=50)),
        ("halfcheetah-medium-expert", dict(beam_width=32, horizon=15)),
        ("walker2d-medium-expert", dict(beam_width=128, horizon=5, cdf_act=0.6)),
        (
            "hopper-medium",
            dict(beam_width=128, horizon=15, k_act=0, cdf_act=0.6, n_epochs_ref=50, max_context=5),
        ),
    ],
)
def test_settings_left_out_follow_the_tt_config_of_the_dataset(name, expected):
    args, sources = tt.resolve_settings(tt.Args(), name, 400_000, None)
    assert {k: getattr(args, k) for k in expected} == expected
    for k in expected:
        entry = k in tt.TT_DATASETS.get(name, {})
        assert sources[k] == (f"TT config/offline.py for {name}" if entry else "TT base")
    # the TT code's budget: int(10^6 / W x n_epochs_ref) epochs of ceil(W / 256) updates
    assert args.updates == int(1e6 / 400_000 * args.n_epochs_ref) * math.ceil(400_000 / 256)
    # 195k, or 312.5k for replay
    assert args.updates == pytest.approx(1e6 * args.n_epochs_ref / 256, rel=0.01)
    given, sources = tt.resolve_settings(
        tt.Args(beam_width=7, horizon=3, k_act=2, cdf_act=0.1, updates=9), name, 9, None
    )
    assert (given.beam_width, given.horizon, given.k_act, given.cdf_act, given.updates) == (
        7,
        3,
        2,
        0.1,
        9,
    )
    assert all(
        sources[k] == "flag" for k in ("beam_width", "horizon", "k_act", "cdf_act", "updates")
    )


def test_a_walker2d_medium_replay_run_plans_with_its_tt_config_and_says_so(tmp_path, capsys):
    from conftest import random_rollouts, write_hdf5

    path = write_hdf5(
        tmp_path / "walker2d_medium_replay-v2.hdf5", random_rollouts("Walker2d-v4", steps=300)
    )
    args = tt.Args(
        env="walker2d-medium-replay",
        dataset_path=(str(path),),
        n_bins=10,
        seq_len=3,
        n_layer=1,
        n_head=1,
        n_embd=16,
        batch_size=8,
        updates=2,
        eval_episodes=1,
        eval_max_steps=1,
        runs_dir=str(tmp_path / "runs"),
    )
    res = tt.train(args)
    out = capsys.readouterr().out
    saved = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    tt_config = "TT config/offline.py for walker2d-medium-replay"
    assert {k: saved["args"][k] for k in ("beam_width", "horizon", "k_act", "cdf_act")} == dict(
        beam_width=32, horizon=20, k_act=40, cdf_act=0.0
    )
    assert all(
        saved["sources"][k] == tt_config
        for k in ("beam_width", "horizon", "k_act", "cdf_act", "n_epochs_ref")
    )
    assert saved["sources"]["updates"] == "flag" and saved["sources"]["max_context"].startswith(
        "TT base, capped"
    )
    assert (
        f"beam_width 32 ({tt_config})" in out and "horizon 20" in out and "updates 2 (flag)" in out
    )


def test_the_tt_learning_rate_schedule_is_the_tt_codes_unclamped_cosine():
    model = tiny_model()
    rates = {}
    for schedule in ("tt", "clamped"):
        # 10 updates per epoch: a warmup of 1 epoch, the cosine's floor at epoch 3
        opt, sched = tt.make_optimizer(model, 1.0, schedule, warmup_updates=10, decay_updates=30)
        rates[schedule] = []
        for _ in range(71):
            rates[schedule].append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
    tt_rates, ours = rates["tt"], rates["clamped"]
    # the first update at the peak, then k / warm
    assert tt_rates[0] == 1.0 and tt_rates[5] == pytest.approx(0.5)
    # cosine to 10% at epoch 3
    assert tt_rates[20] == pytest.approx(0.5) and tt_rates[30] == pytest.approx(0.1)
    # back at the peak at epoch 5
    assert tt_rates[50] == pytest.approx(1.0) and tt_rates[70] == pytest.approx(0.1)
    # ours holds the floor
    assert ours[0] == pytest.approx(0.1) and ours[30:] == [pytest.approx(0.1)] * 41


def test_planning_runs_in_fp32_while_training_uses_bf16(tmp_path, hdf5_path, monkeypatch):
    """With bf16 active (forced here, native on GPUs), training runs in bf16 but every planning
    forward in fp32 (TT plans in fp32): the evaluation equals the one of a --no-bf16 run of the same
    checkpoint."""
    ck = str(Path(tt.train(tiny_args(tmp_path / "a", hdf5_path))["run_dir"]) / "model.pt")
    monkeypatch.setattr(tt, "bf16_native", lambda device: True)
    real, dtypes = tt.evaluate, set()

    def spy(model, *a, **kw):
        hook = model.register_forward_hook(lambda m, i, o: dtypes.add(o[0].dtype))
        try:
            return real(model, *a, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(tt, "evaluate", spy)
    bf16 = tt.train(tiny_args(tmp_path / "b", hdf5_path, checkpoint=ck, updates=0))
    assert dtypes == {torch.float32} and bf16["bf16"] and not bf16["plan_bf16"]
    fp32 = tt.train(tiny_args(tmp_path / "c", hdf5_path, checkpoint=ck, updates=0, bf16=False))
    assert bf16["returns"] == fp32["returns"]
    dtypes.clear()
    tt.train(tiny_args(tmp_path / "d", hdf5_path, checkpoint=ck, updates=0, plan_bf16=True))
    assert dtypes == {torch.bfloat16}  # on request


def test_beam_scores_and_the_nll_are_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 100, generator=g).softmax(-1)
    mid = torch.linspace(-1, 1000, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = tt.expected_value(probs, mid)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e, (probs.double() @ mid.double()).float(), rtol=1e-6, atol=1e-4)
    logits, targets = torch.randn(2, 5, 8, generator=g), torch.randint(0, 8, (2, 5), generator=g)
    loss = tt.tt_loss(logits.bfloat16(), targets, torch.ones(5))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss, tt.tt_loss(logits.bfloat16().float(), targets, torch.ones(5)), rtol=0, atol=0
    )
