"""rgdt.py's speed numbers (issue 28 items 3-4): updates/s from measured intervals, each closed by
one device synchronize at a logging point (never one per update), evaluations and saves left out;
--compile's compile time reported apart (compile_time_s), its first updates not counted in the
speed; compiled updates that compute what the eager ones do."""

import json
from pathlib import Path

import pytest
import torch

import rgdt
from test_rgdt import tiny_args


def clock_of(run_dir) -> dict:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["resume"]["clock"]


def test_the_device_is_waited_for_once_per_measured_interval_not_per_update(
    tmp_path, hdf5_path, monkeypatch
):
    waits = []
    monkeypatch.setattr(rgdt, "wait_for", lambda device: waits.append(device.type))
    args = tiny_args(tmp_path, hdf5_path, eval_every=10, log_every=5, save_every=1000)
    res = rgdt.train(args)
    # 2 x 20 updates. Per phase 5 logging points (steps 0, 5, 10, 15 and the last) close an
    # interval, and so does the evaluation after step 9 in the translator's (the saves find theirs
    # closed); and one wait as each of the 4 evaluations ends
    assert len(waits) == 5 + 6 + 4 < 40
    clock = clock_of(res["run_dir"])
    assert clock["inverse"]["timed_updates"] == clock["translator"]["timed_updates"] == 20
    assert res["train_updates_per_s"] == pytest.approx(20 / clock["translator"]["train_time_s"])
    assert res["compile_time_s"] is None and clock["translator"]["compile_time_s"] == 0.0


def test_a_stopwatch_books_compile_time_apart_and_times_only_updates(monkeypatch):
    now = iter(range(0, 1000, 10))  # every clock read 10 s later
    monkeypatch.setattr(rgdt.time, "perf_counter", lambda: next(now))
    clock = {"train_time_s": 0, "timed_updates": 0, "compile_time_s": 0}
    timer = rgdt.Stopwatch(clock, torch.device("cpu"), rgdt.COMPILE_WARMUP)
    for _ in range(rgdt.COMPILE_WARMUP):  # t = 0; the last of them closes the interval: t = 10
        timer.start()
        timer.lap()
    timer.stop()  # nothing open: nothing booked
    for _ in range(2):
        timer.start()  # t = 20, then still open
        timer.lap()
    timer.stop()  # t = 30: two timed updates in 10 s
    assert clock == {"train_time_s": 10, "timed_updates": 2, "compile_time_s": 10}


def test_a_checkpoint_from_before_the_stopwatches_resumes_with_its_time():
    assert rgdt.phase_clocks(None, {"inverse": 0, "translator": 0})["translator"] == {
        "train_time_s": 0.0, "timed_updates": 0, "compile_time_s": 0.0}  # fmt: skip
    old = {"clock": {"inv_train_time_s": 2.0, "train_time_s": 3.0, "wall_time_s": 9.0}}
    clock = rgdt.phase_clocks(old, {"inverse": 20, "translator": 6})
    assert clock["wall_time_s"] == 9.0 and set(clock) == {"wall_time_s", "inverse", "translator"}
    assert clock["inverse"] == {"train_time_s": 2.0, "timed_updates": 20, "compile_time_s": 0.0}
    assert clock["translator"] == {"train_time_s": 3.0, "timed_updates": 6, "compile_time_s": 0.0}


def test_five_compiled_updates_match_five_eager_ones(tmp_path, hdf5_path):
    """On a CPU --compile compiles the state predictor (inductor); the same five updates of both
    phases, to float tolerance. Dropout off: compiled kernels draw their own random numbers."""
    runs = {}
    for compiled in (False, True):
        args = tiny_args(
            tmp_path / str(compiled),
            hdf5_path,
            updates=5,
            inv_updates=5,
            log_every=1,
            eval_every=0,
            eval_episodes=1,
            dropout=0.0,
            bf16=False,
            compile=compiled,
        )
        res = rgdt.train(args)
        lines = (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        runs[compiled] = res, [json.loads(x) for x in lines if '"loss"' in x]
    (eager, eager_lines), (comp, comp_lines) = runs[False], runs[True]
    assert [x["phase"] for x in comp_lines] == ["inverse"] * 5 + ["translator"] * 5
    for e, c in zip(eager_lines, comp_lines):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4), c
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3), c
    assert comp["compile_time_s"] > 0 and eager["compile_time_s"] is None
    clock = clock_of(comp["run_dir"])
    assert clock["translator"]["timed_updates"] == 5 - rgdt.COMPILE_WARMUP  # the compiling ones
    assert clock["inverse"]["timed_updates"] == 5  # not compiled on a CPU


def test_the_cuda_graph_update_is_the_eager_update(monkeypatch):
    """graphed() as on CUDA, with torch.compile stood in by the function itself: compiled once in
    mode reduce-overhead with static shapes, the optimizer step kept out of the trace, a new graph
    step marked at each call, and the updates are the eager ones, bit for bit."""
    compiled, steps = [], []

    def fake_compile(fn, **kwargs):
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    arch = dict(return_len=4, state_len=3, n_enc_layer=1, n_layer=1, n_head=2, n_embd=16,
                dropout=0.0, rtg_scale=1.0, inv_hidden=16, inv_layers=1, inv_dropout=0.0,
                state_dim=5, act_dim=2, arch="seq2seq")  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "returns": torch.randn(4, 4, 1, generator=g),
            "states": torch.randn(4, 3, 5, generator=g),
            "next_states": torch.randn(4, 3, 5, generator=g),
            "mask": torch.ones(4, 3, dtype=torch.bool),
        }
        for _ in range(5)
    ]
    out = {}
    for name in ("eager", "graphed"):
        torch.manual_seed(0)
        model, inv = rgdt.make_models(arch, "cpu")
        opt, sched = rgdt.make_optimizer(model, rgdt.Args(warmup_steps=4))
        inv_opt = rgdt.make_inv_optimizer(inv, 1e-4, 1e-4)
        compile = name == "graphed"
        fwd, step, _ = rgdt.compiled_updates(model, opt, inv_opt, torch.device("cuda"), compile)
        off = torch.autocast("cpu", enabled=False)
        losses = []
        for b in batches:
            losses.append(step(fwd, opt, b, 0.25, False, off)[0].item())
            sched.step()
        out[name] = losses, [p.detach().clone() for p in model.parameters()]
        # the optimizer step stays out of the trace, in both models, only when compiled
        assert all(
            getattr(o.step, "_torchdynamo_disable", False) == compile for o in (opt, inv_opt)
        )
    assert compiled == [{"mode": "reduce-overhead", "dynamic": False}] * 2 and len(steps) == 5
    assert out["graphed"][0] == out["eager"][0]
    for a, b in zip(out["graphed"][1], out["eager"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
