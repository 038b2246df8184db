"""Writes iem_attention_reference.json: the attention arrays benchmarks/iem_analysis.py produced
before issue 29 took `return_attn` out of iem.py (commit 7acb83d, where MaskedPlanModel returned
every block's weights on request). tests/test_iem_attention.py checks that today's forward hooks
give the same arrays on the same tiny models and inputs, which it builds with this file's `models`
and `run_args`. The recording (`old_arrays`) runs only against that commit's code (`git archive
7acb83d | tar -x -C /tmp/old`, copy this file to /tmp/old/tests/data/, run it there).

    python tests/data/iem_attention_reference.py OUT.json
"""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import iem  # noqa: E402
import iem_analysis  # noqa: E402
from attention import random_init  # noqa: E402

LEVEL = "GoToLocalS7N5"
# A tiny model on the level's 7 x 7 grid: T = 1 + 8 words + 3 actions = 12 tokens.
ARCH = dict(grid=(7, 7), mission_len=8, horizon=3, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
STATES, SEED = 3, 0  # evaluation start states whose plans are fed back, and their seed
KEYS = (
    "layers",
    "masked_query_past_mass",
    "masked_query_future_mass",
    "row_effective_keys",
    "row_distance_from_uniform",
    "real_tokens",
)


def sharpen(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Larger query/key weights than the init (near-uniform rows): peaked attention, so that a map
    computed the wrong way (heads mixed up, padding shifted) cannot pass by being uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            w = block.attn.in_proj_weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return model


def models() -> tuple:
    """The fixed tiny 'checkpoint' (seed 1) and its random-init control (seed 3), both sharpened."""
    return tuple(sharpen(random_init(iem.MaskedPlanModel, seed=s, **ARCH), s) for s in (1, 3))


def run_args(tmp: Path) -> iem.Args:
    """iem_analysis's flags of a --quick run on LEVEL, with the tiny model's horizon."""
    a = iem_analysis.Args(quick=True, runs_dir=str(tmp / "runs"), data_dir=str(tmp / "data"))
    return iem_analysis.run_args(a, LEVEL, SEED, horizon=ARCH["horizon"])


def flatten(summary: dict, who: str) -> dict:
    return {f"{who}_{k}": np.array(summary[k], np.float32) for k in KEYS}


def old_arrays(tmp: Path) -> dict:
    torch.set_num_threads(1)
    model, control = models()
    args = run_args(tmp)
    images, words, copies = iem_analysis.plan_inputs(model, args, ARCH, 2, SEED)
    out = {"copies": copies.numpy()}
    with torch.no_grad():
        _, attns = model(images, words, copies, copies=ARCH["horizon"], return_attn=True)
    for i, att in enumerate(attns):
        out[f"raw_{i}"] = att.numpy()
    s = iem_analysis.attention(model, args, ARCH, STATES, SEED, control)
    return out | flatten(s, "ours") | flatten(s["control"], "control")


if __name__ == "__main__":
    import tempfile

    import reference_arrays  # this folder, on the path when run as a script

    with tempfile.TemporaryDirectory() as tmp:
        reference_arrays.save(sys.argv[1], old_arrays(Path(tmp)))
