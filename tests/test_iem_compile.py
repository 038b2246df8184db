"""iem.py --compile (issue 28 item 3) and its timing (item 4): compiled updates are the eager ones,
the compile's updates are timed apart, and training time is measured in intervals that end where
the run waits for the device, never one update at a time."""

import time

import numpy as np
import pytest
import torch

import iem

LEVEL = "GoToLocalS7N5"
ARCH = dict(grid=(7, 7), mission_len=5, horizon=3, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def fake_data(n=64, seed=0) -> dict:
    """Steps of a few episodes, as make_dataset lays them out: one agent per grid."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 7, 7, 3), np.int64)
    images[..., 0] = rng.integers(1, 3, (n, 7, 7))  # empty cells and walls
    images[np.arange(n), rng.integers(0, 7, n), rng.integers(0, 7, n)] = [iem.AGENT, 0, 0]
    end = np.repeat([16, 32, 48, 64], 16)
    words = rng.integers(0, len(iem.WORDS) + 2, (n, ARCH["mission_len"]))
    arrays = {"images": images, "actions": rng.integers(0, iem.N_ACTIONS, n), "end": end}
    return {k: torch.as_tensor(v) for k, v in (arrays | {"words": words}).items()}


def trained(compile: bool, updates=5):
    """`updates` updates of a fixed tiny model on fixed batches: each one's loss and gradient norm,
    and the weights."""
    torch.manual_seed(0)
    model = iem.MaskedPlanModel(**ARCH)
    opt, _ = iem.make_optimizer(model, 1e-3, updates)
    step, fwd = iem.compiled_update(model, opt, torch.device("cpu"), compile)
    gen, data = torch.Generator().manual_seed(0), fake_data()
    autocast = torch.autocast("cpu", enabled=False)
    out = []
    for _ in range(updates):
        batch = iem.sample_batch(data, 8, ARCH["horizon"], gen)
        losses, grad_norm = step(fwd, opt, batch, True, autocast)
        out += [losses["masked"].item(), grad_norm.item()]
    return out, model.state_dict()


def test_five_compiled_updates_are_the_eager_ones():
    """On a CPU --compile compiles the model (inductor's kernels: other roundings than eager's)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eager, eager_weights = trained(compile=False)
        compiled, compiled_weights = trained(compile=True)
    finally:
        torch.set_num_threads(threads)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert len(set(eager[::2])) == 5  # the updates change the model: the test can fail
    for name, w in eager_weights.items():
        if name.endswith("attn.in_proj_bias"):
            # The key bias adds the same to every score of a query, which the softmax takes away:
            # its gradient is rounding noise, and Adam scales noise to full-size steps. Eager and
            # compiled kernels round differently, so only the query and value biases are compared.
            w, compiled_weights[name] = (
                w.view(3, -1)[[0, 2]],
                compiled_weights[name].view(3, -1)[[0, 2]],
            )
        torch.testing.assert_close(compiled_weights[name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_the_stopwatch_times_intervals_and_the_warmup_apart(monkeypatch):
    """Compile time holds the first updates, even when a logging point falls inside them; training
    time the rest; the device is waited for once an interval, never once an update."""
    now, waits = [0.0], []
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(iem, "wait_for", lambda device: waits.append(now[0]))
    clock = {"train_time_s": 0.0, "compile_time_s": 0.0, "timed_updates": 0}
    timer = iem.Stopwatch(clock, torch.device("cpu"), warmup=3)
    for step in range(10):
        timer.start()
        now[0] += 10.0 if step < 3 else 1.0  # the compile's updates are slow
        timer.lap()
        if step % 4 == 0:  # logging points at steps 0, 4, 8: the first inside the warmup
            timer.stop()
    timer.stop()  # the end
    assert clock == {"train_time_s": 7.0, "compile_time_s": 30.0, "timed_updates": 7}
    assert waits == [10.0, 30.0, 32.0, 36.0, 37.0]  # steps 0 and 2 (warmup), 4, 8 and the end
    timer.stop()  # a second stop times nothing
    assert clock["timed_updates"] == 7 and len(waits) == 5


def test_a_compiled_run_reports_its_compile_time_apart(tmp_path):
    iem.collect_demos(LEVEL, 4, tmp_path / "data" / f"{iem.env_id(LEVEL)}__bot4.npz")
    size = {k: v for k, v in ARCH.items() if k in iem.ARCH}
    budget = dict(collect=4, updates=6, batch_size=8, eval_episodes=1, iterations=1, log_every=2)
    where = dict(runs_dir=str(tmp_path / "runs"), data_dir=str(tmp_path / "data"), threads=1)
    res = iem.train(iem.Args(env=LEVEL, compile=True, bf16=False, **size, **budget, **where))
    assert res["compile_time_s"] > 0 and res["train_updates_per_s"] > 0
    assert res["args"]["compile"] is True and res["updates"] == 6
