"""A checkpoint whose weights do not fit the architecture it records (an edited or a foreign file) is one line naming
the problem, exit non-zero, no traceback from inside torch, and no run folder left behind (issue 25)."""

from pathlib import Path

import pytest
import torch

import rgdt
import tt


def broken(ckpt_path: Path, key: str = "model") -> Path:
    """The same checkpoint with one weight matrix of the wrong shape."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    name = next(n for n, w in ckpt[key].items() if w.dim() == 2)
    ckpt[key][name] = torch.zeros(3, 3)
    out = ckpt_path.with_name("broken.pt")
    torch.save(ckpt, out)
    return out


def test_rgdt_refuses_weights_that_do_not_fit_in_one_line(tmp_path, hdf5_path):
    import test_rgdt

    res = rgdt.train(test_rgdt.tiny_args(tmp_path, hdf5_path, updates=2, inv_updates=2, eval_every=0))
    bad = broken(Path(res["run_dir"]) / "model.pt")
    evals = tmp_path / "evals"
    with pytest.raises(SystemExit, match=r"^error: the checkpoint's weights do not fit the architecture it records"):
        rgdt.train(rgdt.Args(checkpoint=str(bad), updates=0, eval_episodes=1, runs_dir=str(evals)))
    assert not evals.exists() or not any(evals.iterdir())


def test_tt_refuses_weights_that_do_not_fit_in_one_line(tmp_path, hdf5_path):
    import test_tt

    res = tt.train(test_tt.tiny_args(tmp_path, hdf5_path, updates=2, eval_every=0))
    bad = broken(Path(res["run_dir"]) / "model.pt")
    evals = tmp_path / "evals"
    with pytest.raises(SystemExit, match=r"^error: the checkpoint's weights do not fit the architecture it records"):
        tt.train(tt.Args(checkpoint=str(bad), updates=0, eval_episodes=1, eval_max_steps=2, runs_dir=str(evals)))
    assert not evals.exists() or not any(evals.iterdir())
