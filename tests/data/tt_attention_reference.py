"""Writes tt_attention_reference.json: the attention arrays tt_analysis.py produced before
issue 29 took `return_attn` out of tt.py and dt.py (commit 5815f1d, where both models returned their
weights on request). tests/test_tt_attention.py checks that today's forward hooks give the same
arrays on the same tiny models and inputs, which it builds with this file's `models` and `setup`.
The recording (`old_arrays`) runs only against that commit's code (`git archive 5815f1d | tar -x -C
/tmp/old`, copy this file to /tmp/old/tests/data/, run it there).

    python tests/data/tt_attention_reference.py OUT.json
"""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
import common  # noqa: E402
import conftest  # noqa: E402
import dt  # noqa: E402
import tt  # noqa: E402
import tt_analysis  # noqa: E402
from attention import random_init  # noqa: E402

# Tiny models of both kinds on hopper (11 + 3 dims): TT's K = 2 transitions (31 tokens), DT's 4
# steps.
TT_SIZE = (11, 3, 20, 2, 2, 2, 16, 0.0)
DT_ARCH = dict(state_dim=11, act_dim=3, policy="deterministic", timestep_embedding=True,
               context_len=4, n_layer=2, n_head=2, n_embd=16, dropout=0.0, max_ep_len=1000,
               rtg_scale=1000.0)  # fmt: skip


def sharpen(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Larger query/key weights than GPT's init (std 0.02, near-uniform rows): peaked attention,
    so that a map computed the wrong way (heads mixed up, mask shifted) cannot pass by being
    uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            w = block.attn.qkv.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    return model


def models(episodes) -> dict:
    """The fixed tiny 'checkpoints': TT and DT (seeds 1, 2) and their random-init controls (3,
    4)."""
    tt_model, tt_control = (sharpen(random_init(tt.TrajectoryTransformer, *TT_SIZE, seed=s), s)
                            for s in (1, 3))  # fmt: skip
    obs = np.concatenate([ep["observations"] for ep in episodes])
    ckpt = {"arch": DT_ARCH, "dataset": {"env_id": "Hopper-v4"}, "args": {"target_return": None}}
    ckpt["state_mean"] = torch.as_tensor(obs.mean(0))
    ckpt["state_std"] = torch.as_tensor(obs.std(0) + 1e-6)
    ckpt["model"] = sharpen(random_init(dt.DecisionTransformer, seed=2, **DT_ARCH), 2).state_dict()
    pi = tt_analysis.DTPolicy(ckpt, torch.device("cpu"))
    control = pi.control(4)
    sharpen(control.model, 4)
    return {"tt": tt_model, "tt_control": tt_control, "dt": pi, "dt_control": control}


def setup(tmp: Path) -> tuple:
    """The test suite's hopper-random dataset (tests/conftest.py), its facts, the TT bins, flags of
    the tiny TT run and of the analysis."""
    path = conftest.write_hdf5(tmp / "hopper_random-v2.hdf5", conftest.random_rollouts())
    episodes, info = common.load_dataset("hopper-random", (str(path),))
    data = tt.make_dataset(episodes, torch.device("cpu"), 20, "quantile", 0.99, -100.0)
    targs = tt.Args(n_bins=20, seq_len=2, n_layer=2, n_head=2, n_embd=16, updates=1, horizon=1,
                    beam_width=2, max_context=2, eval_episodes=2, eval_max_steps=5,
                    seed=0)  # fmt: skip
    args = tt_analysis.Args(env="hopper-random", eval_episodes=2, eval_max_steps=5, beam_width=2,
                            horizon=1, windows=2, controls=1, seed=0)  # fmt: skip
    return episodes, info, data, targs, args


STATS = ("alloc", "mass_by_distance", "entropy", "entropy_normalized", "gini", "mean_weight",
         "var_weight", "cv2_weight")  # fmt: skip


def stats_arrays(prefix: str, roll: dict) -> dict:
    out = {f"{prefix}_{k}": np.array(roll["stats"][k]) for k in STATS}
    out |= {f"{prefix}_control_{k}": np.array(roll["control_stats"][k]) for k in STATS}
    return out | {f"{prefix}_returns": np.array(roll["returns"])}


def old_arrays(tmp: Path) -> dict:
    torch.set_num_threads(1)
    episodes, info, data, targs, args = setup(tmp)
    m = models(episodes)
    cpu = torch.device("cpu")
    x, _ = tt.sample_batch(data, 1, 2, torch.Generator().manual_seed(0))  # one window
    out = {}
    with torch.no_grad():
        out["tt_raw_last_layer"] = m["tt"](x, return_attn=True)[2][-1].numpy()  # (1, heads, T, T)
    maps = tt_analysis.attention_maps(m["dt"], m["tt"], data["disc"], targs, episodes, args, cpu,
                                      (m["dt_control"], m["tt_control"]))  # fmt: skip
    out |= {"dt_maps": maps["dt_maps"], "tt_maps": maps["tt_maps"]}
    for name in ("dt_control", "tt_control"):
        out |= {f"{name}_{k}": np.array(maps[name][k]) for k in ("local", "stripe")}
    disc = data["disc"]
    for beam in (False, True):
        roll = tt_analysis.tt_rollouts(m["tt"], disc, targs, info, args, cpu, beam, m["tt_control"])
        out |= stats_arrays(f"tt_{'beam' if beam else 'greedy'}", roll)
    out |= stats_arrays("dt", tt_analysis.dt_rollouts(m["dt"], info, args, cpu, m["dt_control"]))
    return out


if __name__ == "__main__":
    import tempfile

    import reference_arrays  # this folder, on the path when run as a script

    with tempfile.TemporaryDirectory() as tmp:
        reference_arrays.save(sys.argv[1], old_arrays(Path(tmp)))
