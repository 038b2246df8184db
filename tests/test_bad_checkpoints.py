"""A checkpoint whose weights do not fit the architecture it records (an edited or a foreign file)
is one line naming the problem, exit non-zero, no traceback from inside torch, and no run folder
left behind (issue 25)."""

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

    res = rgdt.train(
        test_rgdt.tiny_args(tmp_path, hdf5_path, updates=2, inv_updates=2, eval_every=0)
    )
    bad = broken(Path(res["run_dir"]) / "model.pt")
    evals = tmp_path / "evals"
    with pytest.raises(
        SystemExit, match=r"^error: the checkpoint's weights do not fit the architecture it records"
    ):
        rgdt.train(rgdt.Args(checkpoint=str(bad), updates=0, eval_episodes=1, runs_dir=str(evals)))
    assert not evals.exists() or not any(evals.iterdir())


def test_tt_refuses_weights_that_do_not_fit_in_one_line(tmp_path, hdf5_path):
    import test_tt

    res = tt.train(test_tt.tiny_args(tmp_path, hdf5_path, updates=2, eval_every=0))
    bad = broken(Path(res["run_dir"]) / "model.pt")
    evals = tmp_path / "evals"
    with pytest.raises(
        SystemExit, match=r"^error: the checkpoint's weights do not fit the architecture it records"
    ):
        tt.train(
            tt.Args(
                checkpoint=str(bad),
                updates=0,
                eval_episodes=1,
                eval_max_steps=2,
                runs_dir=str(evals),
            )
        )
    assert not evals.exists() or not any(evals.iterdir())


@pytest.mark.parametrize("name", ["dt", "mo_dt", "trdt"])
def test_the_dt_family_refuses_weights_that_do_not_fit_and_says_which_arch_flags_it_ignores(
    tmp_path, hdf5_path, name, capsys
):
    import importlib

    import test_dt

    module = importlib.import_module(name)
    base = {
        k: v
        for k, v in vars(test_dt.tiny_args(tmp_path, hdf5_path)).items()
        if k in ("env", "dataset_path")
    }
    small = dict(
        n_embd=16, n_layer=1, n_head=1, batch_size=4, updates=2, warmup_steps=1, eval_every=0
    )
    res = module.train(
        module.Args(**base, **small, eval_episodes=1, runs_dir=str(tmp_path / "runs"))
    )
    ckpt = Path(res["run_dir"]) / "model.pt"
    evals = tmp_path / "evals"
    again = module.train(
        module.Args(
            checkpoint=str(ckpt),
            updates=0,
            n_embd=64,
            n_layer=1,
            eval_episodes=1,
            runs_dir=str(evals),
        )
    )
    assert again["arch"]["n_embd"] == 16  # the checkpoint's architecture, and it is said
    # --n-layer 1 equals it: not listed
    assert "ignoring --n-embd 64 (it has 16)" in capsys.readouterr().out
    (ran,) = evals.iterdir()
    with pytest.raises(
        SystemExit, match=r"^error: the checkpoint's weights do not fit the architecture it records"
    ):
        bad = module.Args(
            checkpoint=str(broken(ckpt)),
            updates=0,
            eval_episodes=1,
            exp_name="bad",
            runs_dir=str(evals),
        )
        module.train(bad)
    assert list(evals.iterdir()) == [ran]  # the refused run left no folder


def test_a_context_longer_than_any_episode_is_refused_before_anything_runs():
    import dt

    with pytest.raises(SystemExit, match=r"--context-len 5000: must be <= --max-ep-len 1000"):
        dt.Args(context_len=5000)
