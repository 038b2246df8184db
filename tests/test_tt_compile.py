"""tt.py's --compile (issue 28 item 3): compiled updates are the eager ones, and the compile time is
reported apart from the training speed. Both ways of compiling run here on the CPU: the model alone
(what a CPU run does) and the whole update (what a CUDA run does; on a CPU, mode reduce-overhead
compiles without CUDA graphs, so the same code is traced: clip, optimizer step and the tensor
learning rate included)."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import tt

N_UPDATES = 5


def tiny(seed=0):
    torch.manual_seed(seed)
    model = tt.TrajectoryTransformer(3, 2, 10, 3, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    opt, sched = tt.make_optimizer(model, 6e-4, "tt", warmup_updates=2, decay_updates=10)
    return model, opt, sched


def five_updates(how: str) -> tuple:
    """Losses and gradient norms of five updates on fixed batches, and the weights after them; the
    learning rate changes at every update (warmup, then the cosine)."""
    model, opt, sched = tiny()
    gen = torch.Generator().manual_seed(0)
    data = {"tokens": torch.randint(0, 10, (200, 7), generator=gen), "end": torch.full((200,), 200)}
    data |= {"starts": torch.arange(190), "disc": tt.Discretizer(torch.zeros(11, 7))}
    weights = tt.token_weights(model, model.block_size, 5.0, 1.0, 1.0)
    autocast = torch.autocast("cpu", enabled=False)
    run_update = tt.compiled_update(model, opt, weights, 1.0, autocast, how)
    out = []

    def step():
        loss, grad_norm = run_update(tt.sample_batch(data, 4, 3, gen))
        sched.step()
        out.extend([loss.item(), grad_norm.item()])

    step()  # compiles
    # the rate is a tensor that the schedule fills: its changes must not recompile
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(N_UPDATES - 1):
            step()
    return out, [p.detach().clone() for p in model.parameters()]


def test_five_updates_compiled_whole_match_five_eager_ones():
    """The CUDA way (the whole update compiled), on the CPU."""
    eager = five_updates("eager")
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduce-overhead on a CPU: "skipping cudagraphs"
        compiled = five_updates("update")
    # The compiled kernels sum in another order: losses equal to float32 rounding (an update moves
    # them by ~1e-2 here). Adam's step is about the rate (6e-4) whatever the gradient's size, so a
    # weight whose gradient is near 0 may differ by a thousandth of a step
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    for p, q in zip(compiled[1], eager[1]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


def test_a_compiled_run_matches_eager_and_reports_compile_time_apart(tmp_path, hdf5_path):
    """The CPU way (the model compiled), through train(): the same losses and weights as eager
    (no dropout: compiled dropout draws its masks from another stream), compile_time_s apart, and
    updates/s over the updates after the compiling ones."""
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), n_bins=20, seq_len=3,
                n_layer=2, n_head=2, n_embd=32, dropout=0.0, batch_size=8, updates=N_UPDATES,
                horizon=2, beam_width=1, max_context=2, eval_episodes=1, eval_max_steps=2,
                log_every=1, warmup_epochs=0.01, bf16=False, threads=1)  # fmt: skip
    torch._dynamo.reset()
    runs = [tt.train(tt.Args(**base, compile=c, runs_dir=str(tmp_path / str(c)))) for c in (1, 0)]
    metrics = [(Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines() for r in runs]
    losses = [[m["loss"] for m in map(json.loads, lines) if "loss" in m] for lines in metrics]
    assert len(losses[0]) == N_UPDATES and losses[0] == pytest.approx(losses[1], rel=1e-5)
    ckpts = [torch.load(Path(r["run_dir"]) / "model.pt", weights_only=True) for r in runs]
    for name, w in ckpts[0]["model"].items():
        torch.testing.assert_close(w, ckpts[1]["model"][name], rtol=1e-5, atol=1e-5)
    compiled, eager = runs
    assert compiled["compile_time_s"] > 0 and eager["compile_time_s"] is None
    clock = ckpts[0]["resume"]["clock"]
    assert clock["timed_updates"] == N_UPDATES - tt.COMPILE_WARMUP and clock["train_time_s"] > 0
    assert compiled["train_updates_per_s"] == clock["timed_updates"] / clock["train_time_s"]
    assert ckpts[1]["resume"]["clock"]["timed_updates"] == N_UPDATES
