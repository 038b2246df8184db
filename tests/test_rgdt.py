import ast
import dataclasses
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tyro

import common
import dt
import rgdt

ROOT = Path(__file__).resolve().parents[1]
DT_RESULT_KEYS = {
    "method",
    "bf16",
    "args",
    "trained_with",
    "arch",
    "dataset",
    "target_return",
    "device",
    "threads",
    "git_commit",
    "torch",
    "returns",
    "lengths",
    "normalized",
    "return_mean",
    "normalized_mean",
    "normalized_std",
    "eval_env_steps_per_s",
    "updates",
    "trained_updates",
    "run_dir",
    "train_updates_per_s",
    "wall_time_s",
}
SHARED = (
    "check_flags setup bf16_native load_checkpoint load_data make_run_dir log_metrics "
    "start_tracking finish_tracking git_commit make_eval_envs returns_to_go masked_mean "
    "bounded_log_std head_loss make_optimizer"
).split()


def tiny_args(tmp_path, hdf5_path, **kw):
    base = dict(
        env="hopper-random",
        dataset_path=(str(hdf5_path),),
        updates=20,
        inv_updates=20,
        batch_size=8,
        inv_batch_size=16,
        n_embd=32,
        n_enc_layer=1,
        n_layer=2,
        n_head=2,
        inv_hidden=32,
        warmup_steps=5,
        eval_every=10,
        eval_episodes=2,
        runs_dir=str(tmp_path / "runs"),
        log_every=5,
    )
    return rgdt.Args(**{**base, **kw})


def episode(rewards, obs_dim=2, offset=0.0):
    n = len(rewards)
    obs = np.arange(n * obs_dim, dtype=np.float32).reshape(n, obs_dim) + offset
    rewards = np.asarray(rewards, np.float32)
    return dict(
        observations=obs, actions=np.zeros((n, 1), np.float32), rewards=rewards, terminated=True
    )


def test_shared_blocks_are_dt_pys():
    """The PLUMBING and the shared method blocks are dt.py's, byte for byte (issue 14: siblings are
    diffs)."""
    for name in SHARED:
        assert inspect.getsource(getattr(rgdt, name)) == inspect.getsource(getattr(dt, name)), name
    assert rgdt.METHOD == "rgdt"


def test_defaults_are_section_2_4():
    a = rgdt.Args()
    # translator: hidden 64, 2 heads, 2 encoder + 3 decoder layers, K_r = 20, K_s = 5, AdamW
    # 5e-4, warmup 1e4,
    # weight decay 1e-3, dropout 0.1, 150k steps, batch 256; final-token loss (indicator 0)
    assert (a.n_embd, a.n_head, a.n_enc_layer, a.n_layer, a.return_len, a.state_len) == (
        64,
        2,
        2,
        3,
        20,
        5,
    )
    assert (a.lr, a.warmup_steps, a.weight_decay, a.dropout, a.updates, a.batch_size) == (
        5e-4,
        10_000,
        1e-3,
        0.1,
        150_000,
        256,
    )
    assert a.full_context_loss is False and a.target_return is None and a.env is None
    assert rgdt.DEFAULT_ENV == "hopper-medium"  # without --env or --checkpoint: a Table 2.1 dataset
    # inverse dynamics: 2 x 512 hidden, Adam 1e-4, weight decay 1e-4, dropout 0.1, 200k steps,
    # batch 1024
    inv_flags = (
        a.inv_layers,
        a.inv_hidden,
        a.inv_lr,
        a.inv_weight_decay,
        a.inv_dropout,
        a.inv_updates,
        a.inv_batch_size,
    )
    assert inv_flags == (2, 512, 1e-4, 1e-4, 0.1, 200_000, 1024)
    inv = rgdt.make_inverse_dynamics(11, 3, a.inv_hidden, a.inv_layers, a.inv_dropout)
    # mean and log-std of a_t
    assert [m.out_features for m in inv if isinstance(m, torch.nn.Linear)] == [512, 512, 6]
    assert rgdt.Args(checkpoint="x.pt").env is None  # with a checkpoint: its own dataset


def test_inv_updates_default_trains_unless_a_checkpoint_is_only_evaluated():
    """Issue 25, item 3: `--checkpoint CK --updates 0` evaluates; the inverse dynamics trains only
    when asked."""
    assert (
        rgdt.Args().inv_updates == 200_000 and rgdt.Args(checkpoint="x.pt").inv_updates == 200_000
    )
    assert rgdt.Args(checkpoint="x.pt", updates=0).inv_updates == 0
    assert rgdt.Args(checkpoint="x.pt", updates=0, inv_updates=5).inv_updates == 5
    # given: trains
    assert rgdt.Args(checkpoint="x.pt", updates=0, inv_updates=200_000).inv_updates == 200_000
    assert rgdt.Args(resume="runs/RUN").inv_updates is None  # the run's own, from its config.json
    with pytest.raises(SystemExit, match="--updates 0 leaves a model untrained"):
        rgdt.Args(updates=0)


def test_segments_hold_past_states_next_states_and_future_returns():
    # ep0: rewards 1..6 -> g = 21, 20, 18, 15, 11, 6; ep1 follows it in the flat arrays
    # (global 6..9)
    data = rgdt.make_dataset(
        [episode([1, 2, 3, 4, 5, 6]), episode([7, 7, 7, 7], offset=100)], torch.device("cpu"), 1.0
    )
    # a step without successor is no example
    assert data["valid"].tolist() == [0, 1, 2, 3, 4, 6, 7, 8]
    b = rgdt.gather_segments(data, torch.tensor([1, 4, 6]), K_r=4, K_s=3)
    S = data["states"]
    assert b["mask"].tolist() == [[False, True, True], [True, True, True], [False, False, True]]
    # left-padded with zeros
    torch.testing.assert_close(b["states"][0], torch.stack([torch.zeros(2), S[0], S[1]]))
    torch.testing.assert_close(b["next_states"][0], torch.stack([torch.zeros(2), S[1], S[2]]))
    torch.testing.assert_close(b["states"][1], S[2:5])
    torch.testing.assert_close(b["next_states"][1], S[3:6])
    # g_{t+1..t+K_r}: t = 1 -> g_2..g_5; t = 4 -> g_5 then 0 (the episode is over, ep1's
    # returns must not leak)
    assert b["returns"][..., 0].tolist() == [[18, 15, 11, 6], [6, 0, 0, 0], [21, 14, 7, 0]]
    # --arch gpt's returns: g_{j+1} beside each state s_j (0 beside padding)
    assert b["step_returns"][..., 0].tolist() == [[0, 20, 18], [15, 11, 6], [0, 0, 21]]


def test_a_checkpoints_normalization_is_kept():
    eps = [episode([1, 2, 3, 4])]
    mean, std = np.array([1.0, -1.0], np.float32), np.array([2.0, 4.0], np.float32)
    data = rgdt.make_dataset(eps, torch.device("cpu"), 1.0, state_stats=(mean, std))
    torch.testing.assert_close(
        data["states"], torch.as_tensor((eps[0]["observations"] - mean) / std)
    )
    np.testing.assert_array_equal(data["state_stats"][0], mean)
    np.testing.assert_array_equal(data["state_stats"][1], std)
    own = rgdt.make_dataset(eps, torch.device("cpu"), 1.0)
    assert not torch.allclose(own["states"], data["states"])


def test_batches_are_uniform_over_steps_with_a_successor():
    data = rgdt.make_dataset(
        [episode([1] * 5), episode([1] * 30, offset=1000)], torch.device("cpu"), 1.0
    )
    b = rgdt.sample_batch(data, 4000, 4, 3, torch.Generator().manual_seed(0))
    # ep1's normalized states are the positive ones
    from_long = (b["states"][:, -1, 0] > 0).float().mean().item()
    assert from_long == pytest.approx(29 / 33, abs=0.03)


def test_best_return_per_timestep_on_a_hand_made_dataset():
    eps = [episode([1, 1, 1]), episode([5]), episode([0, 0, 0, 0, 2]), episode([-1] * 6)]
    # returns-to-go: [3,2,1], [5], [2,2,2,2,2], [-6,-5,-4,-3,-2,-1]; only the last episode
    # reaches t = 5
    best = rgdt.best_return_sequence(eps)
    np.testing.assert_allclose(best, [5, 2, 2, 2, 2, -1])
    assert rgdt.conditioning_returns(best, None) is best  # §2.3.3 as it is
    # --target-return rescales
    np.testing.assert_allclose(rgdt.conditioning_returns(best, 10.0), [10, 4, 4, 4, 4, -2])
    with pytest.raises(
        SystemExit, match=r"--target-return 10\.0: the best return at t = 0 is -1\.0"
    ):
        rgdt.conditioning_returns(np.array([-1.0, 2.0]), 10.0)


def small_model(dropout=0.0, cls=rgdt.DecisionTranslator):
    """A tiny model of either architecture (the translator's or --arch gpt's: one constructor)."""
    torch.manual_seed(0)
    arch = dict(state_dim=3, return_len=4, state_len=5, n_enc_layer=2, n_layer=2, n_head=2)
    return cls(**arch, n_embd=16, dropout=dropout, rtg_scale=1.0).eval()


def random_inputs(B=2):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(B, 4, 1, generator=g),
        torch.randn(B, 5, 3, generator=g),
        torch.ones(B, 5, dtype=torch.bool),
    )


def test_decoder_is_causal_over_states():
    model = small_model()
    returns, s, mask = random_inputs()
    mean, log_std = model(returns, s, mask)
    for j in range(5):
        s2 = s.clone()
        s2[:, j] += 5.0
        mean2, log_std2 = model(returns, s2, mask)
        torch.testing.assert_close(mean2[:, :j], mean[:, :j])  # position i < j never sees s_j
        torch.testing.assert_close(log_std2[:, :j], log_std[:, :j])
        # positions >= j do
        assert all(not torch.allclose(mean2[:, i], mean[:, i]) for i in range(j, 5))


def test_every_position_sees_every_encoded_return():
    model = small_model()
    returns, s, mask = random_inputs()
    mean, _ = model(returns, s, mask)
    for k in range(4):
        r2 = returns.clone()
        r2[:, k] += 1.0
        mean2, _ = model(r2, s, mask)
        # even the first state
        assert all(not torch.allclose(mean2[:, i], mean[:, i]) for i in range(5))


def test_padded_positions_do_not_leak_and_match_a_shorter_context():
    model = small_model()
    returns, s, mask = random_inputs()
    mask[:, :2] = False
    mean, _ = model(returns, s, mask)
    s2 = s.clone()
    s2[:, :2] = 9.0
    torch.testing.assert_close(model(returns, s2, mask)[0][:, 2:], mean[:, 2:])
    # evaluation feeds short contexts at the start of an episode, without padding: both must agree
    torch.testing.assert_close(model(returns, s[:, 2:])[0], mean[:, 2:])


def small_gpt():
    return small_model(cls=rgdt.StateGPT)


def test_gpt_reads_interleaved_return_and_state_tokens_causally():
    """--arch gpt (issue 27, item 5): tokens g_{j+1}, s_j per step; step j's prediction sees its own
    two tokens and every earlier one, never a later step's."""
    model = small_gpt()
    gen = torch.Generator().manual_seed(1)
    returns, s, mask = (
        torch.randn(2, 5, 1, generator=gen),
        torch.randn(2, 5, 3, generator=gen),
        torch.ones(2, 5).bool(),
    )
    mean, log_std = model(returns, s, mask)
    assert mean.shape == log_std.shape == (2, 5, 3)
    for j in range(5):
        for which in ("returns", "states"):
            g2, s2 = returns.clone(), s.clone()
            (g2 if which == "returns" else s2)[:, j] += 5.0
            mean2 = model(g2, s2, mask)[0]
            torch.testing.assert_close(mean2[:, :j], mean[:, :j])  # earlier steps never see step j
            assert all(not torch.allclose(mean2[:, i], mean[:, i]) for i in range(j, 5)), (which, j)
    # padding: both tokens of a padded step are hidden, and a short context (an episode's
    # start) reads the same
    mask[:, :2] = False
    padded = model(returns, s, mask)[0]
    g2, s2 = returns.clone(), s.clone()
    g2[:, :2], s2[:, :2] = 9.0, 9.0
    torch.testing.assert_close(model(g2, s2, mask)[0][:, 2:], padded[:, 2:])
    torch.testing.assert_close(model(returns[:, 2:], s[:, 2:])[0], padded[:, 2:])


def test_gpt_trains_evaluates_and_is_reloaded_from_its_checkpoint(tmp_path, hdf5_path, capsys):
    short = dict(updates=6, inv_updates=4, eval_every=0, arch="gpt", full_context_loss=True)
    res = rgdt.train(tiny_args(tmp_path, hdf5_path, **short))
    assert "GPT state predictor" in capsys.readouterr().out
    ckpt = torch.load(Path(res["run_dir"]) / "model.pt", weights_only=True)
    assert ckpt["arch"]["arch"] == "gpt" and any(k.startswith("blocks.") for k in ckpt["model"])
    alone = rgdt.train(
        rgdt.Args(
            checkpoint=str(Path(res["run_dir"]) / "model.pt"),
            updates=0,
            eval_episodes=2,
            runs_dir=str(tmp_path / "ev"),
        )
    )
    assert alone["returns"] == res["returns"]  # the checkpoint rebuilds the GPT, not a translator


def test_state_loss_indicator_on_hand_computed_values():
    mean, log_std = torch.zeros(1, 3, 1), torch.zeros(1, 3, 1)
    target = torch.tensor([[[1.0], [2.0], [3.0]]])
    mask = torch.tensor([[False, True, True]])
    c = 0.5 * math.log(2 * math.pi)
    # indicator 0: only the final position, 0.5 * 3^2 + c
    assert rgdt.state_loss(mean, log_std, target, mask, full_context=False).item() == pytest.approx(
        4.5 + c
    )
    # indicator 1: the real positions 1, 2: (0.5 * 4 + 0.5 * 9) / 2 + c; the padded one is ignored
    assert rgdt.state_loss(mean, log_std, target, mask, full_context=True).item() == pytest.approx(
        3.25 + c
    )
    target[0, 0] = 100.0
    assert rgdt.state_loss(mean, log_std, target, mask, full_context=True).item() == pytest.approx(
        3.25 + c
    )
    target[0, 1] = 100.0  # a real, non-final position: only the full-context loss sees it
    assert rgdt.state_loss(mean, log_std, target, mask, full_context=False).item() == pytest.approx(
        4.5 + c
    )
    assert rgdt.state_loss(mean, log_std, target, mask, full_context=True).item() > 1000
    # Eq. 2.6's diagonal Gaussian: dims add, a std of 2 costs log 2 and divides the squared
    # error by 4
    two, one = torch.tensor([[0.0, math.log(2.0)]]), torch.ones(1, dtype=torch.bool)
    nll = rgdt.head_loss(torch.zeros(1, 2), two, torch.tensor([[1.0, 2.0]]), one).item()
    assert nll == pytest.approx(0.5 + 0.5 + math.log(2) + 2 * c)


def test_inverse_dynamics_learns_an_exactly_invertible_transition():
    # s_{t+1} = s_t + B a_t with B invertible: a_t = B^{-1} (s_{t+1} - s_t) is a function of
    # the two states
    rng = np.random.default_rng(0)
    B = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.3, 0.0, 1.0]], np.float32)
    s = rng.normal(size=(2000, 3)).astype(np.float32)
    a = rng.uniform(-0.9, 0.9, size=(2000, 3)).astype(np.float32)
    eps = [
        dict(
            observations=np.stack([s[i], s[i] + B @ a[i]]),
            actions=np.stack([a[i], np.zeros(3, np.float32)]),
            rewards=np.zeros(2, np.float32),
            terminated=True,
        )
        for i in range(2000)
    ]
    data = rgdt.make_dataset(eps, torch.device("cpu"), 1.0)
    torch.manual_seed(0)
    inv = rgdt.make_inverse_dynamics(3, 3, hidden=64, layers=2, dropout=0.0)
    t = data["valid"][:500]

    def error():
        with torch.no_grad():
            mean, _ = rgdt.inverse_dynamics(inv, data["states"][t], data["states"][t + 1])
        return (mean - data["actions"][t]).abs().mean().item()

    before = error()
    opt, gen = torch.optim.Adam(inv.parameters(), lr=1e-2), torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = rgdt.inverse_dynamics_loss(inv, rgdt.sample_transitions(data, 128, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 0.3 and error() < 0.05


def test_optimizers_decay_matrices_only_and_warm_up():
    model = small_model()
    opt, sched = rgdt.make_optimizer(model, rgdt.Args(weight_decay=0.5, lr=1.0, warmup_steps=4))
    decayed, plain = opt.param_groups
    name = {id(p): n for n, p in model.named_parameters()}
    decayed_names, plain_names = ({name[id(p)] for p in g["params"]} for g in (decayed, plain))
    # the learned positions are (K, C) matrices but positions, not weights: never decayed
    assert {"pos_g", "pos_s"} <= plain_names and not any(
        n.startswith("pos_") for n in decayed_names
    )
    assert decayed["weight_decay"] == 0.5 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(
        p.dim() == 1 or name[id(p)].startswith("pos_") for p in plain["params"]
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    inv = rgdt.make_inverse_dynamics(3, 2, 8, 2, 0.0)
    inv_opt = rgdt.make_inv_optimizer(inv, lr=1e-3, weight_decay=1e-4)
    decayed, plain = inv_opt.param_groups
    # §2.4: Adam
    assert isinstance(inv_opt, torch.optim.Adam) and not isinstance(inv_opt, torch.optim.AdamW)
    assert (
        len(decayed["params"]) == 3 and len(plain["params"]) == 3 and plain["weight_decay"] == 0.0
    )
    assert decayed["weight_decay"] == 1e-4 and decayed["lr"] == 1e-3


class RecordingTranslator(torch.nn.Module):
    """Stands in for the translator in evaluate(): records what Alg. 2 feeds it, proposes s_{t+1} =
    s_t + 1."""

    conditioning = "returns"

    def __init__(self, state_len=3, return_len=4):
        super().__init__()
        self.state_len, self.return_len, self.rtg_scale, self.calls = state_len, return_len, 1.0, []

    def forward(self, returns, states, mask=None):
        self.calls.append((returns.clone(), states.clone()))
        return states + 1.0, torch.zeros_like(states)


class RecordingInverse(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.zeros(len(x), 6)  # mean 0 -> action 0, Hopper has 3 action dims


def evaluate(model, inv, info, conditioning):
    stats = (np.zeros(info["obs_dim"], np.float32), np.ones(info["obs_dim"], np.float32))
    settings, off = rgdt.EvalSettings(episodes=2), torch.autocast("cpu", enabled=False)
    cpu = torch.device("cpu")
    return rgdt.evaluate(model, inv, info, stats, conditioning, settings, cpu, off)


def test_inference_follows_algorithm_2(hdf5_path):
    # Alg. 2: at step t the translator reads g_{t+1..t+K_r} of the conditioning sequence and
    # the last K_s observed
    # states; the inverse dynamics reads (s_t, s^_{t+1}), s^_{t+1} the translator's final position.
    _, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    model, inv = RecordingTranslator(), RecordingInverse()
    res = evaluate(model, inv, info, np.arange(6.0))  # returns past the sequence's end are 0
    assert len(model.calls) == max(res["lengths"]) >= 5
    for t, (returns, states) in enumerate(model.calls[:5]):
        expected = [float(g) if g < 6 else 0.0 for g in range(t + 1, t + 5)]
        assert (
            returns.shape == (2, 4, 1)
            and returns[0, :, 0].tolist() == expected == returns[1, :, 0].tolist()
        )
        assert states.shape == (2, min(t + 1, 3), 11)  # shorter at the start, then the last K_s
        s_t = states[:, -1]
        torch.testing.assert_close(inv.inputs[t], torch.cat([s_t, s_t + 1.0], -1))
    # the window slides by one state
    torch.testing.assert_close(model.calls[3][1][:, :2], model.calls[2][1][:, 1:])


def test_gpt_inference_reads_each_context_state_with_its_own_return(hdf5_path):
    """--arch gpt in Alg. 2: beside each context state s_j the conditioning sequence's g_{j+1}."""
    _, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    model = RecordingTranslator()
    model.conditioning = "step_returns"
    evaluate(model, RecordingInverse(), info, np.arange(6.0))
    for t, (returns, states) in enumerate(model.calls[:6]):
        window = range(max(0, t - 2), t + 1)  # K_s = 3
        assert returns.shape == (2, len(window), 1) and states.shape == (2, len(window), 11)
        assert returns[0, :, 0].tolist() == [float(j + 1) if j + 1 < 6 else 0.0 for j in window]


def test_evaluation_shows_its_progress_in_episodes_and_env_steps(hdf5_path, monkeypatch):
    """Issue 25, item 4: a bar of the episodes done, with the env steps taken, that leaves nothing
    behind."""
    from tqdm import tqdm

    bars = []

    class Recorded(tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "mininterval": 0, "file": io.StringIO()})
            bars.append(self)

    monkeypatch.setattr(rgdt, "tqdm", Recorded)
    _, info = common.load_dataset("hopper-random", (str(hdf5_path),))
    res = evaluate(RecordingTranslator(), RecordingInverse(), info, np.arange(6.0))
    (bar,) = bars
    assert bar.desc == "evaluate" and bar.total == 2 and bar.n == 2 and not bar.leave
    assert bar.postfix == f"env_steps={sum(res['lengths'])}"


def test_evaluation_stops_at_the_horizon_of_an_env_without_a_time_limit(monkeypatch):
    """An env that never ends by itself and has no TimeLimit: evaluation stops at the horizon, and
    the conditioning window never runs past its buffer."""
    import gymnasium as gym

    def endless(info, video=None):
        # TimeLimit stripped
        return gym.make("Hopper-v4", terminate_when_unhealthy=False, max_episode_steps=30).env

    monkeypatch.setattr(common, "make_env", endless)
    info = dict(
        common.D4RL_TABLE["hopper"], name="hopper-random", env_kwargs={}, obs_dim=11, act_dim=3
    )
    model = RecordingTranslator()
    res = evaluate(model, RecordingInverse(), info, np.arange(5000.0))
    # the horizon when the spec names none
    assert res["lengths"] == [1000, 1000] and len(model.calls) == 1000
    # the last window: g_{t+1..t+K_r}
    assert model.calls[-1][0][0, :, 0].tolist() == [1000, 1001, 1002, 1003]


@pytest.mark.parametrize("full_context", [False, True])
def test_end_to_end_with_evaluation(tmp_path, hdf5_path, full_context, monkeypatch, capsys):
    flags, state_loss = [], rgdt.state_loss  # the indicator each translator update trains with

    def recording_loss(*a):
        flags.append(a[-1])
        return state_loss(*a)

    monkeypatch.setattr(rgdt, "state_loss", recording_loss)
    res = rgdt.train(tiny_args(tmp_path, hdf5_path, full_context_loss=full_context))
    assert flags == [full_context] * 20
    out, err = capsys.readouterr()
    # each training has its own progress bar
    assert "inverse: 100%" in err and "translator: 100%" in err
    assert "thesis Table 2.1" in out and "local file data" in out
    # both counts, labelled
    assert "(local file data, translator 20, inverse dynamics 20 updates)" in out
    # every evaluation says the same thing the same way (issue 25, item 10), the last one
    # before the final line
    said = re.findall(
        r"^(inverse dynamics|translator) update (\d+): normalized score -?\d+\.\d ± \d+\.\d$",
        out,
        re.M,
    )
    assert said == [
        ("inverse dynamics", "0"),
        ("translator", "0"),
        ("translator", "10"),
        ("translator", "20"),
    ]
    run = Path(res["run_dir"])
    assert {p.name for p in run.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "results.json",
        "model.pt",
    }
    saved = json.loads((run / "results.json").read_text())
    rgdt_keys = {"inv_updates", "trained_inv_updates", "inv_train_updates_per_s", "compile_time_s"}
    # not compiled
    assert set(saved) == DT_RESULT_KEYS | rgdt_keys and saved["compile_time_s"] is None
    assert saved["args"]["full_context_loss"] == full_context and len(saved["returns"]) == 2
    assert saved["device"] == "cpu" and saved["dataset"]["source"] == "file"
    assert saved["normalized_mean"] == pytest.approx(
        np.mean(common.normalized_score(saved["dataset"], saved["returns"]))
    )
    assert (
        saved["train_updates_per_s"] > 0
        and saved["inv_train_updates_per_s"] > 0
        and saved["eval_env_steps_per_s"] > 0
    )
    assert (
        saved["updates"],
        saved["trained_updates"],
        saved["inv_updates"],
        saved["trained_inv_updates"],
    ) == (20,) * 4
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(line["phase"], line["step"]) for line in lines if "eval_normalized" in line]
    assert evals == [("inverse", 0), ("translator", 0), ("translator", 10), ("final", 20)]
    for phase in ("inverse", "translator"):
        assert [line["step"] for line in lines if line["phase"] == phase and "loss" in line] == [
            0,
            5,
            10,
            15,
            19,
        ]
    ckpt = torch.load(run / "model.pt", weights_only=True)  # plain data
    assert (
        ckpt["method"] == "rgdt" and ckpt["arch"]["n_layer"] == 2 and len(ckpt["best_returns"]) > 0
    )


def losses(res):
    lines = map(json.loads, (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines())
    return [line["loss"] for line in lines if "loss" in line]


def test_same_seed_same_run(tmp_path, hdf5_path):
    short = dict(updates=10, inv_updates=10, eval_every=0)
    a = rgdt.train(tiny_args(tmp_path / "a", hdf5_path, **short))
    b = rgdt.train(tiny_args(tmp_path / "b", hdf5_path, **short))
    c = rgdt.train(tiny_args(tmp_path / "c", hdf5_path, **short, seed=1))
    assert losses(a) == losses(b) and a["returns"] == b["returns"]
    assert losses(a) != losses(c)


def test_a_checkpoint_alone_evaluates_and_trains_on(tmp_path, hdf5_path, capsys):
    trained = rgdt.train(tiny_args(tmp_path, hdf5_path, updates=6, inv_updates=4, eval_every=0))
    ckpt = Path(trained["run_dir"]) / "model.pt"
    # `--checkpoint CK --updates 0` alone (issue 25, item 3): only the checkpoint, its own
    # dataset facts, architecture,
    # state normalisation and best returns; no data file read, and neither model trains
    cli = [
        "--checkpoint",
        str(ckpt),
        "--updates",
        "0",
        "--eval-episodes",
        "2",
        "--n-layer",
        "5",
        "--state-len",
        "3",
        "--runs-dir",
        str(tmp_path / "ev"),
    ]
    capsys.readouterr()
    res = rgdt.train(tyro.cli(rgdt.Args, args=cli))
    assert (
        "evaluating only: 2 episodes of at most 1000 steps (2000 environment steps"
        in capsys.readouterr().out
    )
    assert res["returns"] == trained["returns"] and res["arch"]["n_layer"] == 2
    assert res["arch"]["state_len"] == 5 and res["dataset"] == trained["dataset"]
    assert (
        res["updates"],
        res["inv_updates"],
        res["trained_updates"],
        res["trained_inv_updates"],
    ) == (0, 0, 6, 4)
    assert not (Path(res["run_dir"]) / "model.pt").exists()  # nothing trained, nothing saved
    assert "__rgdt-eval__" in Path(res["run_dir"]).name and res["trained_with"] == trained["args"]
    # trained updates add up across checkpoints, for each model
    more = rgdt.train(
        tiny_args(
            tmp_path,
            hdf5_path,
            checkpoint=str(ckpt),
            updates=3,
            inv_updates=0,
            eval_every=0,
            exp_name="more",
        )
    )
    assert (more["trained_updates"], more["trained_inv_updates"]) == (9, 4)
    more_ckpt = Path(more["run_dir"]) / "model.pt"
    # the checkpoint's data is read
    inv_more = rgdt.train(
        rgdt.Args(
            checkpoint=str(more_ckpt),
            updates=0,
            inv_updates=2,
            eval_episodes=1,
            inv_batch_size=16,
            runs_dir=str(tmp_path / "inv"),
        )
    )
    assert "__rgdt__" in Path(inv_more["run_dir"]).name  # it trains: not an evaluation
    saved = torch.load(Path(inv_more["run_dir"]) / "model.pt", weights_only=True)
    assert (saved["trained_updates"], saved["trained_inv_updates"]) == (9, 6) and saved[
        "method"
    ] == "rgdt"
    first = torch.load(ckpt, weights_only=True)
    torch.testing.assert_close(saved["state_mean"], first["state_mean"])
    torch.testing.assert_close(saved["best_returns"], first["best_returns"])


@pytest.mark.parametrize("bad, message", [
    (dict(batch_size=0), "--batch-size 0: must be > 0"),
    (dict(inv_batch_size=0), "--inv-batch-size 0: must be > 0"),
    (dict(state_len=0), "--state-len 0: must be > 0"),
    (dict(grad_clip=0.0), "--grad-clip 0.0: must be > 0"),
    (dict(grad_clip=-1.0), "--grad-clip -1.0: must be > 0"),
    (dict(seed=-1), "--seed -1: must be >= 0"),
    (dict(inv_updates=-5), "--inv-updates -5: must be >= 0"),
    (dict(threads=-2), "--threads -2: must be >= 0"),
    (dict(lr=float("nan")), "--lr nan: must be > 0"),
    (dict(inv_lr=0.0), "--inv-lr 0.0: must be > 0"),
    (dict(dropout=1.0), "--dropout 1.0: must be in"),
    (dict(inv_dropout=-0.1), "--inv-dropout -0.1: must be in"),
    (dict(target_return=float("nan")), "--target-return nan: pass a finite return > 0"),
    (dict(target_return=-5.0), "--target-return -5.0: pass a finite return > 0"),
    (dict(n_embd=30, n_head=4), "--n-embd 30 must be divisible by --n-head 4"),
    (dict(updates=0), "--updates 0 leaves a model untrained; add --checkpoint"),
    (dict(inv_updates=0), "--inv-updates 0 leaves a model untrained; add --checkpoint"),
])  # fmt: skip
def test_bad_flags_name_the_flag_and_its_value(tmp_path, hdf5_path, bad, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(".", r"\.")):
        tiny_args(tmp_path, hdf5_path, **bad)


def test_bad_inputs_get_clear_errors_and_leave_nothing_behind(tmp_path, hdf5_path):
    evaluate_only = dict(updates=0, inv_updates=0)
    with pytest.raises(SystemExit, match="no such file"):
        rgdt.train(
            tiny_args(tmp_path, hdf5_path, **evaluate_only, checkpoint=str(tmp_path / "none.pt"))
        )
    with pytest.raises(SystemExit, match="unknown dataset 'hopper-mediun'"):
        rgdt.train(tiny_args(tmp_path, hdf5_path, env="hopper-mediun"))
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint torch can read as data"):
        rgdt.train(
            tiny_args(tmp_path, hdf5_path, **evaluate_only, checkpoint=str(tmp_path / "garbage.pt"))
        )
    torch.save(dict(method="dt", model={}), tmp_path / "dt.pt")
    with pytest.raises(SystemExit, match="written by dt, not rgdt.py"):
        rgdt.train(
            tiny_args(tmp_path, hdf5_path, **evaluate_only, checkpoint=str(tmp_path / "dt.pt"))
        )
    # a pickled object: refused
    torch.save(dict(method="rgdt", model=torch.nn.Linear(1, 1)), tmp_path / "code.pt")
    with pytest.raises(SystemExit, match="not a checkpoint torch can read as data"):
        rgdt.train(
            tiny_args(tmp_path, hdf5_path, **evaluate_only, checkpoint=str(tmp_path / "code.pt"))
        )
    walker = dict(name="walker2d-random", env_id="Walker2d-v4", obs_dim=17, act_dim=6, path=None)
    torch.save(dict(method="rgdt", dataset=walker), tmp_path / "walker.pt")
    with pytest.raises(
        SystemExit, match=r"trained on walker2d-random \(Walker2d-v4\), not on data of Hopper-v4"
    ):
        rgdt.train(
            tiny_args(tmp_path, hdf5_path, **evaluate_only, checkpoint=str(tmp_path / "walker.pt"))
        )
    with pytest.raises(SystemExit, match="is not a device"):
        rgdt.train(tiny_args(tmp_path, hdf5_path, device="gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            rgdt.train(tiny_args(tmp_path, hdf5_path, device="cuda"))
    assert not (tmp_path / "runs").exists()  # no run folder is left behind by a refused run
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--runs-dir .*file/x: cannot make a run folder there"):
        rgdt.train(tiny_args(tmp_path, hdf5_path, runs_dir=str(tmp_path / "file" / "x")))


def test_an_existing_run_folder_is_never_overwritten(tmp_path, hdf5_path, monkeypatch):
    monkeypatch.setattr(rgdt.time, "time", lambda: 1234.0)
    args = tiny_args(tmp_path, hdf5_path, updates=2, inv_updates=2, eval_every=0)
    run = Path(args.runs_dir) / "hopper-random__rgdt__0__1234"
    run.mkdir(parents=True)
    (run / "results.json").write_text("precious")
    with pytest.raises(SystemExit, match="already exists"):
        rgdt.train(args)
    assert (run / "results.json").read_text() == "precious"


def test_cli_help_explains_every_flag():
    """Every Args field has a docstring, and --help shows each one in full next to its flag."""
    out = subprocess.run(
        [sys.executable, "rgdt.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(out.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())
    args_class = next(
        n
        for n in ast.parse((ROOT / "rgdt.py").read_text()).body
        if getattr(n, "name", "") == "Args"
    )
    docs = {
        a.target.id: b.value.value
        for a, b in zip(args_class.body, args_class.body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(b.value.value, str)
    }
    assert set(docs) == {f.name for f in dataclasses.fields(rgdt.Args)}, (
        "a field without a docstring"
    )
    for name, doc in docs.items():
        assert "--" + name.replace("_", "-") in flat and " ".join(doc.split()) in flat, name
    # the usage examples are shown too
    assert "--checkpoint runs/RUN/model.pt --updates 0 " in flat and "--resume runs/RUN" in flat
    assert "indicator" in flat and "best return" in flat and "§2.4" in flat and "Alg. 2" in flat


def test_updates_per_second_do_not_count_evaluations(tmp_path, hdf5_path, monkeypatch):
    fake = dict(returns=[0.0], lengths=[1], normalized=[0.0], return_mean=0.0, normalized_mean=0.0,
                normalized_std=0.0, eval_env_steps_per_s=1.0)  # fmt: skip

    def slow_eval(*a, **kw):
        time.sleep(0.5)
        return fake

    monkeypatch.setattr(rgdt, "evaluate", slow_eval)
    # 3 evaluations inside the translator's loop
    res = rgdt.train(tiny_args(tmp_path, hdf5_path, eval_every=5))
    # counting 3 x 0.5 s of evaluation would give at most 13.3
    assert res["train_updates_per_s"] > 20 / 1.5
    # nor the one before the inverse dynamics' training
    assert res["inv_train_updates_per_s"] > 20 / 1.5


def test_ctrl_c_saves_the_model_trained_so_far(tmp_path, hdf5_path):
    cmd = [
        sys.executable,
        "rgdt.py",
        "--env",
        "hopper-random",
        "--dataset-path",
        str(hdf5_path),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--updates",
        "1000000",
        "--inv-updates",
        "3",
        "--batch-size",
        "4",
        "--inv-batch-size",
        "8",
        "--n-embd",
        "16",
        "--n-layer",
        "1",
        "--n-enc-layer",
        "1",
        "--inv-hidden",
        "16",
        "--eval-episodes",
        "1",
        "--eval-every",
        "1000000",
        "--threads",
        "1",
    ]
    from conftest import interrupt_after

    # the translator's training starts right after its first evaluation is printed
    code, out = interrupt_after(cmd, "translator update 0", tmp_path / "log.txt", settle_s=2)
    assert code == 1 and "Traceback" not in out and "interrupted (Ctrl-C)" in out
    (run,) = (tmp_path / "runs").iterdir()
    saved = torch.load(run / "model.pt", weights_only=True)
    assert saved["trained_inv_updates"] == 3 and 0 < saved["trained_updates"] < 1_000_000
    assert f"holds translator {saved['trained_updates']}, inverse dynamics 3 updates;" in out
    assert f"python rgdt.py --resume {run}" in out


def fake_wandb(monkeypatch):
    """A stand-in for the wandb package that records what it is sent (no network, no account)."""
    import importlib.machinery
    import types

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.calls = {"init": [], "log": [], "summary": {}, "finished": False}
    fake.run = None

    def init(**kw):
        fake.calls["init"].append(kw)
        fake.run = types.SimpleNamespace(summary=fake.calls["summary"])

    def log(metrics, step=None):
        fake.calls["log"].append(dict(metrics))

    def finish():
        fake.calls["finished"], fake.run = True, None

    fake.init, fake.log, fake.finish = init, log, finish
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_track_sends_the_config_every_logged_line_and_the_results(tmp_path, hdf5_path, monkeypatch):
    wandb = fake_wandb(monkeypatch)
    res = rgdt.train(
        tiny_args(
            tmp_path,
            hdf5_path,
            updates=4,
            inv_updates=4,
            eval_every=2,
            track=True,
            wandb_entity="me",
        )
    )
    run = Path(res["run_dir"])
    (init,) = wandb.calls["init"]
    assert init["project"] == "seqrl" and init["entity"] == "me" and init["name"] == run.name
    assert init["config"]["args"]["track"] is True and init["config"]["method"] == "rgdt"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert wandb.calls["log"] == lines and {line["phase"] for line in lines} == {
        "inverse",
        "translator",
        "final",
    }
    assert (
        wandb.calls["summary"]["normalized_mean"] == res["normalized_mean"]
        and wandb.calls["finished"]
    )


def test_track_without_wandb_is_a_clear_error(tmp_path, hdf5_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def no_wandb(name, *a):
        return None if name == "wandb" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", no_wandb)
    with pytest.raises(SystemExit, match=r'--track needs wandb: pip install -e ".\[track\]"'):
        tiny_args(tmp_path, hdf5_path, track=True)


def test_capture_video_films_the_final_evaluations_first_episode(tmp_path, hdf5_path, monkeypatch):
    """The wiring: the final evaluation's first env, and only it, films into the run folder's
    video.mp4. The filming itself (common.make_env's video, ~0.5 s a frame in software OpenGL) is
    tested in test_dt.py."""
    make_env, checked, asked = common.make_env, [], []

    def recording_env(info, video=None):
        asked.append(video)
        return make_env(info)

    # the flag sets it when unset: restored after
    monkeypatch.setenv("MUJOCO_GL", os.environ.get("MUJOCO_GL", "egl"))
    monkeypatch.setattr(common, "make_env", recording_env)
    monkeypatch.setattr(common, "check_video", checked.append)
    res = rgdt.train(
        tiny_args(tmp_path, hdf5_path, updates=2, inv_updates=2, eval_every=0, capture_video=True)
    )
    assert checked == [res["dataset"]] and [v for v in asked if v] == [
        str(Path(res["run_dir"]) / "video.mp4")
    ]
    # the second env and the horizon probe are not filmed
    assert asked.count(None) == len(asked) - 1
