"""Issue 25: a --batch-size or --eval-episodes too large for the machine ends in one line naming
the flag, its value and a value that fits, before the run folder is made; an allocation failure
during a run is one line too, and a run folder that holds nothing is removed (dt, mo_dt, trdt;
rgdt with --inv-batch-size, tt with --beam-width, iem)."""

import dataclasses
import json

import pytest
import torch

import common
import dt
import mo_dt
import trdt

TINY = dict(env="hopper-random", batch_size=8, n_embd=16, n_layer=1, n_head=1, context_len=4)
TINY |= dict(updates=2, warmup_steps=1, eval_episodes=2, eval_every=0, log_every=1, threads=1)


def args_of(module, tmp_path, hdf5_path, **flags):
    return module.Args(
        dataset_path=(str(hdf5_path),), runs_dir=str(tmp_path / "runs"), **TINY | flags
    )


@pytest.mark.parametrize("module", [dt, mo_dt, trdt], ids=lambda m: m.__name__)
def test_flags_too_large_for_memory_are_one_line(module, tmp_path, hdf5_path, monkeypatch):
    monkeypatch.setattr(common, "available_memory", lambda device: 1_000_000_000)  # 1 GB free
    with pytest.raises(SystemExit) as refused:
        module.train(args_of(module, tmp_path, hdf5_path, batch_size=10**7))
    line = str(refused.value)
    assert line.startswith("error: --batch-size 10000000: a training update needs about ")
    assert "more than the 1.0 GB of memory available on cpu; lower --batch-size (about " in line
    assert "\n" not in line
    with pytest.raises(SystemExit, match=r"^error: --eval-episodes 100000: an evaluation needs"):
        module.train(args_of(module, tmp_path, hdf5_path, eval_episodes=10**5))
    assert not (tmp_path / "runs").exists()  # refused before the run folder


@pytest.mark.parametrize("module", [dt, trdt], ids=lambda m: m.__name__)
def test_out_of_memory_in_training_is_one_line_and_leaves_no_run_folder(
    module, tmp_path, hdf5_path, monkeypatch
):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(module, "update", oom)
    with pytest.raises(SystemExit) as caught:
        module.train(args_of(module, tmp_path, hdf5_path))
    line = str(caught.value)
    assert line.startswith("error: --batch-size 8: out of memory on cpu in a training update;")
    assert "is removed" in line and "\n" not in line
    assert not any((tmp_path / "runs").iterdir())


# --- rgdt.py, tt.py, iem.py: the same rules, with their own memory-bound flags -----------------
RGDT = dict(env="hopper-random", updates=4, inv_updates=4, batch_size=8, inv_batch_size=16)
RGDT |= dict(n_embd=16, n_enc_layer=1, n_layer=1, n_head=1, inv_hidden=16, warmup_steps=1)
RGDT |= dict(eval_episodes=2, eval_every=0, log_every=1, threads=1)
TT = dict(env="hopper-random", n_bins=8, seq_len=2, n_layer=1, n_head=1, n_embd=16, batch_size=8)
TT |= dict(updates=3, warmup_epochs=0.01, decay_epochs=1.0, horizon=2, beam_width=3)
TT |= dict(max_context=2, eval_episodes=2, eval_max_steps=4, log_every=1, threads=1)
IEM = dict(env="GoToLocalS7N5", updates=3, batch_size=8, n_layer=1, n_head=1, n_embd=16)
IEM |= dict(horizon=3, iterations=2, eval_episodes=2, log_every=1, threads=1)


@pytest.fixture(scope="module")
def demos_path(tmp_path_factory):
    import iem

    path = tmp_path_factory.mktemp("demos") / "demos.npz"
    iem.collect_demos("GoToLocalS7N5", 4, path)
    return path


def run_args(name, tmp_path, hdf5_path, demos_path, **flags):
    """Tiny Args of rgdt.py, tt.py or iem.py writing under tmp_path/runs."""
    import iem
    import rgdt
    import tt

    runs = str(tmp_path / "runs")
    if name == "iem":
        return iem.Args(dataset=str(demos_path), runs_dir=runs, **IEM | flags)
    module, tiny = (rgdt, RGDT) if name == "rgdt" else (tt, TT)
    return module.Args(dataset_path=(str(hdf5_path),), runs_dir=runs, **tiny | flags)


def method(name):
    return __import__(name)


def no_run_folder_made(module, monkeypatch):
    """A refused run must stop before its folder; today's code would go on and allocate, so
    making the folder fails the test at once instead."""

    def made(*args, **kwargs):
        raise AssertionError("the run folder was made before the memory check")

    monkeypatch.setattr(module, "make_run_dir", made)


# flag, value, what the line says it sizes
TOO_LARGE = {
    "rgdt": [
        ("--batch-size", 10**7, "a translator update"),
        ("--inv-batch-size", 10**8, "an inverse dynamics update"),
        ("--eval-episodes", 10**5, "an evaluation"),
    ],
    "tt": [
        ("--batch-size", 10**6, "a training update"),
        ("--beam-width", 10**6, "a beam search (--n-expand 2 sequences per beam)"),
        ("--eval-episodes", 10**5, "an evaluation"),
    ],
    "iem": [
        ("--batch-size", 10**6, "a training update"),
        ("--eval-episodes", 10**6, "an evaluation (H masked copies of each plan)"),
    ],
}


@pytest.mark.parametrize(
    "name, flag, value, what",
    [(name, *case) for name, cases in TOO_LARGE.items() for case in cases],
    ids=lambda x: str(x),
)
def test_rgdt_tt_iem_flags_too_large_for_memory_are_one_line(
    name, flag, value, what, tmp_path, hdf5_path, demos_path, monkeypatch
):
    module = method(name)
    monkeypatch.setattr(common, "available_memory", lambda device: 1_000_000_000)  # 1 GB free
    no_run_folder_made(module, monkeypatch)
    args = run_args(name, tmp_path, hdf5_path, demos_path, **{flag[2:].replace("-", "_"): value})
    with pytest.raises(SystemExit) as refused:
        module.train(args)
    line = str(refused.value)
    assert line.startswith(f"error: {flag} {value}: {what} needs about "), line
    assert f"more than the 1.0 GB of memory available on cpu; lower {flag} (about " in line
    fits = int(line.split("(about ")[1].split(" fits")[0])
    assert 1 <= fits < value and "\n" not in line
    assert not (tmp_path / "runs").exists()


def test_rgdt_tt_iem_defaults_pass_the_memory_check(monkeypatch):
    """The estimates at the defaults (hopper's dims, BabyAI's 7x7 grids): rgdt and iem need well
    under 1 GB per flag; tt's default evaluation plans 10 episodes x 128 beams x 2 at once, about
    3 GB (measured peaks: 0.7 GB for 2 episodes)."""
    import iem
    import rgdt
    import tt

    monkeypatch.setattr(rgdt, "bf16_native", lambda device: False)
    cpu = torch.device("cpu")
    args = rgdt.Args()
    arch = {k: getattr(args, k) for k in rgdt.ARCH + rgdt.INV_ARCH} | {"arch": "seq2seq"}
    needs = rgdt.memory_needs(args, arch | {"state_dim": 11, "act_dim": 3}, cpu)
    assert set(needs) == {"--batch-size", "--inv-batch-size", "--eval-episodes"}
    assert all(need < 1e9 for _, need, _ in needs.values()), needs
    gpt = rgdt.memory_needs(args, arch | {"arch": "gpt", "state_dim": 11, "act_dim": 3}, cpu)
    assert gpt["--batch-size"][1] != needs["--batch-size"][1]  # 2 K_s tokens, no encoder
    resolved = dataclasses.replace(tt.Args(), **tt.TT_BASE, updates=1)
    needs = tt.memory_needs(resolved, {"obs_dim": 11, "act_dim": 3}, cpu)
    assert set(needs) == {"--batch-size", "--beam-width", "--eval-episodes"}
    assert all(need < 5e9 for _, need, _ in needs.values()), needs  # 10 x 256 beams: ~3 GB
    args = iem.Args(env="GoToLocalS7N5")
    arch = {k: getattr(args, k) for k in iem.ARCH} | {"grid": [7, 7], "mission_len": 9}
    needs = iem.memory_needs(args, arch, cpu)
    assert set(needs) == {"--batch-size", "--eval-episodes"}
    assert all(need < 1e9 for _, need, _ in needs.values()), needs


def raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def raise_memory_error(*args, **kwargs):
    raise MemoryError()


# where an allocation fails, the flags of the run, and the line's start
IN_TRAINING = {
    "rgdt inverse": ("rgdt", "update_inverse", {}, "--inv-batch-size 16", "an inverse dynamics"),
    "tt": ("tt", "update", {}, "--batch-size 8", "a training update"),
    "iem": ("iem", "update", {}, "--batch-size 8", "a training update"),
}


@pytest.mark.parametrize("case", list(IN_TRAINING))
def test_rgdt_tt_iem_out_of_memory_in_training_is_one_line_and_leaves_no_run_folder(
    case, tmp_path, hdf5_path, demos_path, monkeypatch
):
    name, function, flags, flag, what = IN_TRAINING[case]
    module = method(name)
    monkeypatch.setattr(module, function, raise_oom)
    with pytest.raises(SystemExit) as caught:
        module.train(run_args(name, tmp_path, hdf5_path, demos_path, **flags))
    line = str(caught.value)
    assert line.startswith(f"error: {flag}: out of memory on cpu in {what}"), line
    assert "held nothing yet and is removed" in line and "\n" not in line
    assert not any((tmp_path / "runs").iterdir())


def test_rgdt_out_of_memory_in_the_translator_keeps_the_inverse_dynamics_log(
    tmp_path, hdf5_path, demos_path, monkeypatch
):
    import rgdt

    monkeypatch.setattr(rgdt, "update", raise_memory_error)
    with pytest.raises(SystemExit) as caught:
        rgdt.train(run_args("rgdt", tmp_path, hdf5_path, demos_path))
    line = str(caught.value)
    assert line.startswith("error: --batch-size 8: out of memory on cpu in a translator update;")
    assert "keeps what it logged" in line and "\n" not in line
    (run,) = (tmp_path / "runs").iterdir()
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {m["phase"] for m in logged} == {"inverse"}


# the function planning calls, and the flags that put an evaluation before any training
IN_EVALUATION = {"rgdt": ("act", {"eval_every": 2}), "tt": ("plan", {"eval_every": 2})}
IN_EVALUATION |= {"iem": ("plan", None)}  # iem evaluates after training only


@pytest.mark.parametrize(
    "name, first",
    [
        (n, first)
        for n, (_, b) in IN_EVALUATION.items()
        for first in (True, False)
        if b or not first
    ],
    ids=lambda v: {True: "before training", False: "after training"}.get(v, v),
)
def test_rgdt_tt_iem_out_of_memory_in_evaluation_is_one_line(
    name, first, tmp_path, hdf5_path, demos_path, monkeypatch
):
    """Before anything is logged the run folder is removed; after training it keeps its log and
    model.pt."""
    function, before = IN_EVALUATION[name]
    module = method(name)
    monkeypatch.setattr(module, function, raise_memory_error)
    with pytest.raises(SystemExit) as caught:
        module.train(run_args(name, tmp_path, hdf5_path, demos_path, **(before if first else {})))
    line = str(caught.value)
    n = IEM["eval_episodes"] if name == "iem" else 2
    assert line.startswith(f"error: --eval-episodes {n}: out of memory on cpu in an evaluation")
    assert "; lower --eval-episodes; " in line and "\n" not in line
    runs = list((tmp_path / "runs").iterdir())
    if first:
        assert "held nothing yet and is removed" in line and not runs
    else:
        assert "keeps what it logged" in line
        (run,) = runs
        assert (run / "metrics.jsonl").read_text() and (run / "model.pt").is_file()
