"""Issue 28 item 7: the CUDA path of every method file, tested on a CPU. Each method file trains,
evaluates and evaluates its checkpoint again (--checkpoint, --updates 0) in-process with
`--device cuda` under tests/cuda_standin.py's stand-in for a CUDA device, and must keep these
rules:

- no device mismatch, no generator on the wrong device, no .numpy() of a device tensor, anywhere
  (training, evaluation, checkpoint, reload);
- at most SYNCS_PER_UPDATE host-device syncs per training update (batch sampling, forward,
  backward, clipping, optimizer step): the host queues update after update and never waits;
- no sync inside optimizer.step;
- in the training loop outside the update, syncs only where the loop logs a line (.item() of the
  losses), evaluates or saves: never on the other updates;
- at most EVAL_SYNCS_PER_STEP[method] syncs per decision step (act, or plan in tt.py and iem.py)
  of an evaluation: the observation has to reach the device and the action the host, and each
  method's own inputs are counted in the number stated below; a sync per token, layer or beam
  would be many more.

The same rules hold for a run stopped (as by SIGTERM) and continued with --resume on the device
(the loop rule aside), whose checkpoint brings the optimizer and random states back onto it.

A rule a method file breaks today is marked xfail(strict=True) with the file:line and the fix,
so that the case turns green (and the mark must go) when it is fixed.
"""

import json
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cuda_standin import OPTIMIZER, SYNCS, CudaStandIn

METHODS = ["dt", "mo_dt", "trdt", "rgdt", "tt", "iem"]
SYNCS_PER_UPDATE = 0
# Syncs per decision step of an evaluation, with what they are today:
# dt: observation in, action out, reward in (g_{t+1} = g_t - r_t).
# mo_dt, trdt: observation in, action out (g_{t+1} comes from the return head on the device).
# rgdt: observation in, action out.
# tt: observation in, alive mask in, the alive episodes' prefixes out of and their plans into
#   the batch (boolean masks), the timing sync after planning, action out, reward in.
# iem, per plan call (each planning call makes the plans twice, timed without and with the
#   energy trace): the grids and missions in, the plans out (tolist), the timing syncs, the
#   energy trace out.
EVAL_SYNCS_PER_STEP = {"dt": 3, "mo_dt": 2, "trdt": 2, "rgdt": 2, "tt": 7, "iem": 4}
# and per evaluation, once: the action bounds, state statistics or conditioning returns to the
# device, a last timing sync
EVAL_SYNCS_PER_RUN = 8
FINDINGS: dict = {}  # (file, part) -> why it is expected to fail; trdt's region_edges fixed
STEP_PHASES = ("sample", "update")
NOT_LOOP = ("sample", "update", "evaluate", "act", "save")


def tiny_args(name: str, tmp: Path, hdf5_path) -> dict:
    """The smallest run of each method file that still trains, logs, saves and evaluates."""
    run = {"runs_dir": str(tmp / "runs"), "device": "cuda", "threads": 1, "updates": 6}
    # saves only at the end (by default a run this short saves after every update), logs at
    # updates 1, 4 and 6: updates 2, 3 and 5 are plain ones, on which the loop must not sync
    run |= {"save_every": 6, "log_every": 3, "n_head": 2, "n_layer": 1, "batch_size": 8}
    d4rl = run | {"env": "hopper-random", "dataset_path": (str(hdf5_path),), "eval_episodes": 2}
    dt_like = d4rl | {"n_embd": 32, "context_len": 5, "warmup_steps": 2, "eval_every": 0}
    kw = {
        "dt": dt_like | {"eval_every": 3},  # one evaluation inside the training loop
        "mo_dt": dt_like,
        "trdt": dt_like,
        "rgdt": d4rl | {"inv_updates": 6, "inv_batch_size": 16, "n_embd": 32, "n_enc_layer": 1},
        "tt": d4rl | {"n_bins": 20, "seq_len": 3, "n_embd": 32, "warmup_epochs": 0.01},
        "iem": run | {"env": "GoToLocalS7N5", "collect": 12, "n_embd": 16, "horizon": 3},
    }[name]
    if name == "rgdt":
        kw |= {"inv_hidden": 32, "warmup_steps": 2, "eval_every": 0}
    if name == "tt":
        kw |= {"decay_epochs": 1.0, "horizon": 2, "beam_width": 2, "max_context": 2}
        kw |= {"eval_max_steps": 6, "eval_every": 0}
    if name == "iem":
        kw |= {"iterations": 2, "eval_episodes": 2, "data_dir": str(tmp / "data")}
    return kw


def checkpoint_args(name: str, kw: dict, model_pt: Path) -> dict:
    """The same run flags, evaluating the trained run's model.pt (one episode)."""
    kw = kw | {"checkpoint": str(model_pt), "updates": 0, "eval_episodes": 1}
    return kw | ({"inv_updates": 0} if name == "rgdt" else {})


def train_under_standin(module, args):
    """One in-process run of module.train(args) on the stand-in: (its result, the stand-in).
    The stand-in of the last run, also of one that raised, is train_under_standin.last."""
    with CudaStandIn() as gpu:
        train_under_standin.last = gpu
        gpu.watch(module)
        result = module.train(module.Args(**args))
    return result, gpu


def loss_lines(run_dir: Path) -> int:
    """metrics.jsonl's training log lines (each logged point reads the losses back once)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sum(any(k == "loss" or k.startswith("loss_") for k in m) for m in lines)


def training_problems(gpu: CudaStandIn, updates: int, logged=None) -> list[str]:
    """The training rules (module docstring) a run broke, one line each, with the sites;
    the loop rule only given the number of log lines (`logged`)."""
    problems = []
    if gpu.violations():
        problems.append("violations:\n" + gpu.table(gpu.violations()))
    step = [e for e in gpu.syncs() if set(STEP_PHASES) & set(e.phases)]
    if len(step) > SYNCS_PER_UPDATE * updates:
        per = len(step) / updates
        problems.append(
            f"{per:.2f} syncs per update (at most {SYNCS_PER_UPDATE}):\n" + gpu.table(step)
        )
    if gpu.syncs(OPTIMIZER):
        problems.append("syncs inside optimizer.step:\n" + gpu.table(gpu.syncs(OPTIMIZER)))
    loop = [e for e in gpu.syncs(outside=NOT_LOOP) if 0 < e.window < updates]
    busy = gpu.phase_windows["evaluate"] | gpu.phase_windows["save"]
    quiet = sorted({e.window for e in loop} - busy)
    # the last log line follows the last update (window == updates), outside this range
    if logged is not None and len(quiet) > logged - 1:
        where = [e for e in loop if e.window in quiet]
        what = f"syncs after {len(quiet)} updates ({quiet}) but {logged - 1} log lines in between"
        problems.append(what + ":\n" + gpu.table(where))
    return problems


def evaluation_problems(gpu: CudaStandIn, bound: int) -> list[str]:
    """The evaluation rules: no violation; at most `bound` syncs per decision step (and
    EVAL_SYNCS_PER_RUN per evaluation)."""
    problems = ["violations:\n" + gpu.table(gpu.violations())] if gpu.violations() else []
    syncs, steps, runs = gpu.syncs("evaluate"), gpu.calls["act"], gpu.calls["evaluate"]
    if len(syncs) > bound * steps + EVAL_SYNCS_PER_RUN * runs:
        per = (len(syncs) - EVAL_SYNCS_PER_RUN * runs) / max(steps, 1)
        what = f"{per:.2f} syncs per step (at most {bound}) over {runs} evaluation(s)"
        problems.append(what + ":\n" + gpu.table(syncs))
    return problems


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory, hdf5_path):
    """Each method file's training run and checkpoint evaluation on the stand-in, made once."""
    done = {}

    def get(name: str) -> dict:
        if name not in done:
            module = __import__(name)
            tmp = tmp_path_factory.mktemp(f"cuda_{name}")
            kw = tiny_args(name, tmp, hdf5_path)
            t0 = time.time()
            result, train = train_under_standin(module, kw)
            run_dir = Path(result["run_dir"])
            again = checkpoint_args(name, kw, run_dir / "model.pt")
            _, reload = train_under_standin(module, again)
            done[name] = {"train": train, "reload": reload, "run_dir": run_dir, "kw": kw}
            done[name]["seconds"] = time.time() - t0
            print(summary(name, done[name]))
        return done[name]

    return get


def summary(name: str, run: dict) -> str:
    """One line of numbers per method file (pytest -s shows them; the report quotes them)."""
    train, reload, updates = run["train"], run["reload"], run["kw"]["updates"]
    updates += run["kw"].get("inv_updates", 0)
    step = [e for e in train.syncs() if set(STEP_PHASES) & set(e.phases)]
    loop = [e for e in train.syncs(outside=NOT_LOOP) if 0 < e.window < updates]
    evals, steps = reload.syncs("evaluate"), max(reload.calls["act"], 1)
    return (
        f"{name}: {len(step) / updates:.2f} syncs/update, {len(train.syncs(OPTIMIZER))} in "
        f"optimizer.step, {len(loop)} in the loop outside updates, evaluation "
        f"{len(evals) / steps:.2f}/step ({steps} steps, setup included), "
        f"violations {len(train.violations()) + len(reload.violations())}, "
        f"{run['seconds']:.1f} s"
    )


def marked(name: str, part: str):
    finding = FINDINGS.get((name, part))
    return (
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=finding))
        if finding
        else name
    )


@pytest.mark.parametrize("name", [marked(n, "training") for n in METHODS])
def test_training_on_cuda_keeps_the_rules(name, cuda_runs):
    run = cuda_runs(name)
    updates = run["kw"]["updates"] + run["kw"].get("inv_updates", 0)
    assert run["train"].updates == updates  # every update ran under the stand-in
    problems = training_problems(run["train"], updates, loss_lines(run["run_dir"]))
    assert not problems, f"{name}.py on cuda:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", [marked(n, "evaluation") for n in METHODS])
def test_evaluation_and_checkpoint_on_cuda_keep_the_rules(name, cuda_runs):
    run = cuda_runs(name)
    reload = run["reload"]
    assert reload.updates == 0 and reload.calls["act"] > 0
    # the reloaded model's weights are on the device, as --checkpoint on a GPU puts them
    assert any("torch.load onto cuda" in e.what for e in reload.events)
    bound = EVAL_SYNCS_PER_STEP[name]
    problems = evaluation_problems(reload, bound)
    # the training run's own evaluations, by the same rules
    problems += evaluation_problems(run["train"], bound) if run["train"].calls["act"] else []
    assert not problems, f"{name}.py evaluation on cuda:\n" + "\n".join(problems)


def stopped_and_resumed(module, kw: dict, stop_at: int) -> tuple:
    """A run stopped (as by SIGTERM) in its `stop_at`-th update call, then continued with
    --resume; both on the stand-in. Returns the two stand-ins."""
    real, calls = module.update, {"n": 0}

    def stop(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt("SIGTERM")
        return real(*args, **kwargs)

    module.update = stop
    try:
        with pytest.raises(SystemExit, match="interrupted"):
            train_under_standin(module, kw)
    finally:
        module.update = real
    (run_dir,) = Path(kw["runs_dir"]).iterdir()
    _, resumed = train_under_standin(module, {"resume": str(run_dir), "device": "cuda"})
    return train_under_standin.last, resumed


@pytest.mark.parametrize("name", METHODS)
def test_resume_on_cuda_keeps_the_rules(name, tmp_path, hdf5_path):
    """--resume on a GPU: the checkpoint's optimizer state and random states come back onto
    the device (torch.load(map_location=cuda)), and must go where CUDA wants them (a
    generator's state on the host) and keep the updates sync-free."""
    module = __import__(name)
    kw = tiny_args(name, tmp_path, hdf5_path) | {"updates": 4, "eval_episodes": 1}
    kw |= {"eval_every": 0} if "eval_every" in kw else {}
    kw |= {"inv_updates": 2} if name == "rgdt" else {}
    stopped, resumed = stopped_and_resumed(module, kw, stop_at=3)
    assert resumed.updates == 2 and resumed.calls["evaluate"] >= 1
    problems = [f"stopped run: {p}" for p in training_problems(stopped, stopped.updates)]
    problems += training_problems(resumed, 2)  # the loop rule: test_training_on_cuda
    assert not problems, f"{name}.py --resume on cuda:\n" + "\n".join(problems)


# --- The stand-in itself: it sees what a GPU would refuse or wait for ----------------------------


def test_the_standin_flags_mixing_generators_and_numpy():
    with CudaStandIn() as gpu:
        x = torch.ones(3, device="cuda")
        assert x.device == torch.device("cuda", 0) and x.is_cuda and x[1:].is_cuda
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        _ = x * torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar: CUDA takes it
        _ = x + torch.ones(3)  # mixed: refused on a GPU
        cuda_gen = torch.Generator(device="cuda").manual_seed(0)
        assert cuda_gen.device.type == "cuda"
        _ = torch.rand(2, generator=cuda_gen, device="cuda")  # fine
        _ = torch.rand(2, generator=cuda_gen)  # a cuda generator for a CPU op
        _ = torch.randint(3, (2,), generator=torch.Generator(), device="cuda")  # the reverse
        _ = x.numpy()  # refused on a GPU
        _ = np.asarray(x)  # the same
        _ = x.cpu().numpy()  # a copy to the host (a sync), then fine
        cpu_buf = torch.zeros(3)
        cpu_buf.add_(x)  # writes a device result into a host tensor
    kinds = [e.kind for e in gpu.violations()]
    numpy = ["numpy of a device tensor"] * 2
    assert kinds == ["device mismatch"] + ["generator mismatch"] * 2 + numpy + ["device mismatch"]
    assert all(e.site.startswith("test_cuda_standin.py:") for e in gpu.violations())
    assert [e.kind for e in gpu.syncs()] == ["d2h copy"]
    # all off again
    assert not torch.ones(2).is_cuda and torch.ones(2).device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(2, device="cuda")


def test_the_standin_counts_syncs_by_kind_site_and_phase():
    with CudaStandIn() as gpu:
        x = torch.arange(6.0, device="cuda")
        with gpu.phase("update"):
            _ = x.sum().item()
            _ = bool(x.sum() > 0)
            _ = x.tolist()
            _ = x[x > 2]  # boolean mask: its size is read back
            _ = x.nonzero()
            _ = torch.as_tensor(np.ones(3), device="cuda")  # from pageable host memory
            torch.cuda.synchronize()
        pinned = torch.ones(3).pin_memory()
        _ = pinned.to("cuda", non_blocking=True)  # no wait
        _ = x[torch.tensor([0, 1])]  # a host index tensor: copied over
    kinds = [e.kind for e in gpu.syncs("update")]
    assert kinds == ["item", "item", "tolist", "data-dependent shape", "data-dependent shape"] + [
        "h2d copy",
        "synchronize",
    ]
    assert set(kinds) <= set(SYNCS) and not gpu.violations()
    assert [e.kind for e in gpu.syncs(outside=("update",))] == ["h2d copy"]
    line = gpu.syncs("update")[0].site
    assert line.startswith("test_cuda_standin.py:") and "test_the_standin_counts" in line


def test_the_standin_sees_syncs_inside_optimizer_step():
    class Syncing(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                group["lr"] = min(group["lr"], float(group["params"][0].grad.norm()))
            return super().step(closure)

    with CudaStandIn() as gpu:
        model = torch.nn.Linear(3, 2).to("cuda")
        assert all(p.is_cuda for p in model.parameters())
        x = torch.randn(4, 3, device="cuda")
        for opt in (torch.optim.AdamW(model.parameters(), fused=True), Syncing(model.parameters())):
            model(x).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad()
    inside = gpu.syncs(OPTIMIZER)
    assert len(inside) == 1 and inside[0].kind == "item", gpu.table(gpu.events)
    assert not gpu.violations()


def test_the_standin_loads_autocasts_and_seeds_like_a_gpu(tmp_path):
    with CudaStandIn() as gpu:
        model = torch.nn.Linear(3, 2).to("cuda")
        torch.save(model.state_dict(), tmp_path / "m.pt")
        weights = torch.load(
            tmp_path / "m.pt", map_location=torch.device("cuda"), weights_only=True
        )
        assert all(w.is_cuda for w in weights.values())
        host = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)
        assert not any(w.is_cuda for w in host.values())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert model(torch.ones(1, 3, device="cuda")).dtype == torch.bfloat16
        state = torch.cuda.get_rng_state_all()
        assert len(state) == 1 and not state[0].is_cuda
        gen = torch.Generator(device="cuda")
        gen.set_state(gen.get_state())  # a generator's state lives on the host
        gen.set_state(gen.get_state().to("cuda"))  # refused on a GPU
        torch.set_rng_state(torch.get_rng_state().to("cuda"))  # the same
    assert [e.kind for e in gpu.violations()] == ["device mismatch"] * 2


def test_a_method_file_that_syncs_or_mixes_in_its_update_fails_the_rules(tmp_path, hdf5_path):
    """The rules can fail: dt.py's update, broken on purpose, feeds the model a batch tensor
    left on the host and reads its loss back every update."""
    import dt

    real_update = dt.update

    def broken_update(model, opt, batch, *args):
        first = next(iter(batch))
        batch = batch | {first: batch[first].cpu()}  # a host tensor into the model
        losses, grad_norm = real_update(model, opt, batch, *args)
        float(next(iter(losses.values())))  # the host waits for every update
        return losses, grad_norm

    kw = tiny_args("dt", tmp_path, hdf5_path) | {"updates": 3, "eval_every": 0, "eval_episodes": 1}
    dt.update = broken_update
    try:
        result, gpu = train_under_standin(dt, kw)
    finally:
        dt.update = real_update
    problems = training_problems(gpu, 3, loss_lines(Path(result["run_dir"])))
    assert len(problems) == 2, problems
    assert problems[0].startswith("violations:") and "device mismatch" in problems[0]
    assert "syncs per update" in problems[1] and "test_cuda_standin.py" in problems[1]


def test_a_loop_that_syncs_between_updates_fails_the_rules():
    """The loop rule can fail: a sync after every update, where only 3 of 6 are logged."""
    fake = types.SimpleNamespace(update=lambda: None)
    with CudaStandIn() as gpu:
        gpu.watch(fake)
        for _ in range(6):
            fake.update()
            torch.cuda.synchronize()
    problems = training_problems(gpu, 6, logged=3)
    assert len(problems) == 1 and "but 2 log lines in between" in problems[0], problems
