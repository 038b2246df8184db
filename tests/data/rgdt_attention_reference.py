"""Writes rgdt_attention_reference.json: the attention arrays benchmarks/rgdt_analysis.py produced
before issue 29 took `return_attn` and `recorder` out of rgdt.py (commit 5815f1d, where the models
returned their weights on request and evaluate() called a recorder). tests/test_rgdt_attention.py
checks that today's hooks give the same arrays. Kept for the record: it runs only against that
commit's rgdt.py (`git worktree add /tmp/old 5815f1d`, then run this file from /tmp/old's tests/).

    python tests/data/rgdt_attention_reference.py OUT.json
"""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
import common  # noqa: E402
import conftest  # noqa: E402
import rgdt  # noqa: E402
import rgdt_analysis  # noqa: E402

# a tiny architecture of both kinds; K_r and K_s differ so that a transposed map cannot pass
ARCH = dict(return_len=6, state_len=4, n_enc_layer=1, n_layer=2, n_head=2, n_embd=16, dropout=0.1,
            rtg_scale=1000.0, inv_hidden=32, inv_layers=2, inv_dropout=0.1, state_dim=11,
            act_dim=3)  # fmt: skip


def fixture(tmp: Path):
    """The test suite's hopper-random dataset (tests/conftest.py), its tensors and facts."""
    path = conftest.write_hdf5(tmp / "hopper_random-v2.hdf5", conftest.random_rollouts())
    episodes, info = common.load_dataset("hopper-random", (str(path),))
    return episodes, info, rgdt.make_dataset(episodes, torch.device("cpu"), ARCH["rtg_scale"])


def old_arrays(tmp: Path) -> dict:
    torch.set_num_threads(1)
    episodes, info, data = fixture(tmp)
    out = {}
    for kind in ("seq2seq", "gpt"):
        arch = {**ARCH, "arch": kind}
        model = rgdt_analysis.make_predictor(arch, kind, 1, torch.device("cpu"))
        steps = rgdt_analysis.probe_steps(data, arch["state_len"], 4, 2)
        b = rgdt.gather_segments(data, steps, arch["return_len"], arch["state_len"])
        with torch.no_grad():
            _, _, attns = model(b[model.conditioning], b["states"], b["mask"], return_attn=True)
        for i, att in enumerate(attns):
            out[f"{kind}_raw_self_{i}"] = att["self"].numpy()
            if att["cross"] is not None:
                out[f"{kind}_raw_cross_{i}"] = att["cross"].numpy()
        probe = rgdt_analysis.probe_attention(
            model, data, rgdt_analysis.probe_steps(data, 4, 64, 3)
        )
        out[f"{kind}_probe_self_maps"] = np.array(probe["self_maps"], np.float32)
        out[f"{kind}_probe_cross_maps"] = np.array(probe["cross_maps"], np.float32)
        torch.manual_seed(0)
        inv = rgdt.make_models(arch, "cpu")[1].eval()
        ckpt = {"arch": arch, "model": model.state_dict(), "inverse_dynamics": inv.state_dict()}
        ckpt |= {
            k: torch.as_tensor(v) for k, v in zip(("state_mean", "state_std"), data["state_stats"])
        }
        ckpt |= {"best_returns": torch.as_tensor(rgdt.best_return_sequence(episodes))}
        ckpt["args"] = {"target_return": None}
        args = rgdt_analysis.Args(env="hopper-random", eval_episodes=2, seeds=(0,))
        ev = rgdt_analysis.checkpoint_attention(ckpt, info, args, torch.device("cpu"))
        out[f"{kind}_eval_self_maps"] = np.array(ev["self_maps"], np.float32)
        out[f"{kind}_eval_cross_maps"] = np.array(ev["cross_maps"], np.float32)
        out[f"{kind}_eval_samples"] = np.array(ev["samples"])
        out[f"{kind}_eval_returns"] = np.array(ev["returns"])
    return out


if __name__ == "__main__":
    import tempfile

    import reference_arrays  # this folder, on the path when run as a script

    with tempfile.TemporaryDirectory() as tmp:
        reference_arrays.save(sys.argv[1], old_arrays(Path(tmp)))
