"""Issue 25: a --batch-size or --eval-episodes too large for the machine ends in one line naming
the flag, its value and a value that fits, before the run folder is made; an allocation failure
during a run is one line too, and a run folder that holds nothing is removed (dt, mo_dt, trdt)."""

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
