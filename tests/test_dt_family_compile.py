"""--compile (issue 28 item 3) and honest timing (item 4) in dt.py, mo_dt.py and trdt.py: compiled
updates are the eager ones, the compile's updates are timed apart, and training time is measured in
intervals that end where the run waits for the device anyway, never one update at a time."""

import importlib
import json
import time
from pathlib import Path

import pytest
import torch

import dt
import mo_dt
import trdt

METHODS = {"dt": dt, "mo_dt": mo_dt, "trdt": trdt}
TINY = dict(timestep_embedding=False, context_len=4, n_layer=1, n_head=2, n_embd=16, dropout=0.0,
            max_ep_len=100, rtg_scale=100.0, state_dim=11, act_dim=3)  # fmt: skip
EXTRA = {"dt": dict(policy="gaussian"), "mo_dt": dict(gaussian_heads=True),
         "trdt": dict(gaussian_heads=True, bins=3)}  # fmt: skip
CLASSES = {"dt": dt.DecisionTransformer, "mo_dt": mo_dt.MultiObjectiveDecisionTransformer,
           "trdt": trdt.TrustRegionDecisionTransformer}  # fmt: skip


def fake_data(mod, n=200, seed=0) -> dict:
    """make_dataset's layout for four episodes of random steps."""
    g = torch.Generator().manual_seed(seed)
    actions = torch.rand(n, 3, generator=g) * 2 - 1
    steps = {"states": torch.randn(n, 11, generator=g), "actions": actions}
    steps |= {"rtg": torch.randn(n, 1, generator=g), "timesteps": torch.arange(n) % 50}
    if mod is not dt:  # MO-DT's and TRDT's targets: the next state and return
        steps |= {
            "next_states": torch.randn(n, 11, generator=g),
            "next_rtg": torch.randn(n, 1, generator=g),
        }
        steps["has_next"] = torch.ones(n, dtype=torch.bool)
    if mod is trdt:
        steps["regions"] = trdt.encode_regions(actions, 3)
    lengths = torch.tensor([50, 50, 50, 50])
    return {"steps": steps, "ep_start": torch.cumsum(lengths, 0) - lengths, "ep_len": lengths}


def trained(name: str, compile: bool, updates: int = 5):
    """`updates` updates of a fixed tiny model on fixed batches, through compiled_update as train()
    calls it: the losses, gradient norms and weights."""
    mod = METHODS[name]
    torch.manual_seed(0)
    model = CLASSES[name](**TINY, **EXTRA[name])
    opt, _ = mod.make_optimizer(model, mod.Args(lr=1e-3, warmup_steps=0))
    update_fn, fwd = mod.compiled_update(model, opt, torch.device("cpu"), compile)
    assert (fwd is model) != compile  # on a CPU --compile compiles the model
    gen, data = torch.Generator().manual_seed(0), fake_data(mod)
    how = () if mod is dt else (dict.fromkeys(mod.TASKS, 1 / len(mod.TASKS)), "joint")
    autocast = torch.autocast("cpu", enabled=False)
    out = []
    for _ in range(updates):
        batch = mod.sample_batch(data, 8, TINY["context_len"], gen)
        losses, grad_norm = update_fn(fwd, opt, batch, *how, 0.25, autocast)
        out.append((sum(v.item() for v in losses.values()), grad_norm.item()))
    return out, model.state_dict()


@pytest.mark.parametrize("name", ["dt", "trdt"])  # mo_dt's update and blocks are trdt's
def test_five_compiled_updates_are_the_eager_ones(name):
    """On a CPU --compile compiles the model (inductor's kernels: other roundings than eager's)."""
    eager, eager_weights = trained(name, compile=False)
    compiled, compiled_weights = trained(name, compile=True)
    flat = lambda pairs: [x for pair in pairs for x in pair]  # noqa: E731
    assert flat(compiled) == pytest.approx(flat(eager), rel=1e-4)
    assert len({loss for loss, _ in eager}) == 5  # the updates change the model: the test can fail
    for key, w in eager_weights.items():
        c = compiled_weights[key]
        if key.endswith("attn.qkv.bias"):  # the key bias's gradient is 0 but for rounding (softmax
            # ignores what it adds to a whole row), and Adam scales that noise up to a step: left
            # out
            c, w = (torch.cat([x[:16], x[32:]]) for x in (c, w))
        torch.testing.assert_close(c, w, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", list(METHODS))
def test_the_stopwatch_times_intervals_and_the_warmup_apart(monkeypatch, name):
    """Compile time holds the first updates, even when a logging point falls inside them; training
    time the rest; the device is waited for once an interval, never once an update."""
    mod = METHODS[name]
    now, waits = [0.0], []
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(mod, "wait_for", lambda device: waits.append(now[0]))
    clock = {"train_time_s": 0.0, "compile_time_s": 0.0, "timed_updates": 0}
    timer = mod.Stopwatch(clock, torch.device("cpu"), warmup=3)
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
    timing = mod.run_timing(clock | {"wall_time_s": 1.0}, compiled=True, bf16=False, t_start=0.0)
    assert timing["train_updates_per_s"] == 1.0 and timing["compile_time_s"] == 30.0


@pytest.mark.parametrize("name", list(METHODS))
def test_a_run_waits_for_the_device_once_an_interval(monkeypatch, tmp_path, hdf5_path, name):
    """20 updates logged every 5, saved at the end, evaluated once at the end: the training waits
    at its 5 logging points (the last one is the end), the evaluation once; results.json's speed
    counts the 20 updates, and no compile time without --compile."""
    mod = importlib.import_module(name)
    waits = []
    monkeypatch.setattr(mod, "wait_for", lambda device: waits.append(device))
    args = mod.Args(env="hopper-random", dataset_path=(str(hdf5_path),), updates=20, batch_size=4,
                    n_embd=16, n_layer=1, n_head=1, context_len=4, warmup_steps=2, eval_every=0,
                    save_every=20, log_every=5, eval_episodes=1,
                    runs_dir=str(tmp_path))  # fmt: skip
    res = mod.train(args)
    assert len(waits) == 5 + 1
    saved = json.loads((Path(res["run_dir"]) / "results.json").read_text())
    assert saved["train_updates_per_s"] > 0 and saved["compile_time_s"] is None
    assert saved["eval_env_steps_per_s"] > 0
    clock = torch.load(Path(res["run_dir"]) / "model.pt", weights_only=True)["resume"]["clock"]
    assert clock["timed_updates"] == 20 and clock["compile_time_s"] == 0.0
