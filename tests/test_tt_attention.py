"""benchmarks/tt_analysis.py's attention arrays are what they were before issue 29 (item 4): the
models lost `return_attn`, and the analysis captures the weights with forward hooks. The reference,
tests/data/tt_attention_reference.json, was written by the analysis of commit 5815f1d on the fixed
tiny models and inputs of tests/data/tt_attention_reference.py."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "data"))
import reference_arrays  # noqa: E402
import tt_attention_reference as ref  # noqa: E402

import tt  # noqa: E402
import tt_analysis  # noqa: E402  (tt_attention_reference puts benchmarks/ on the path)

REFERENCE = reference_arrays.load(ROOT / "data" / "tt_attention_reference.json")


@pytest.fixture(scope="module")
def new_arrays(tmp_path_factory):
    episodes, info, data, targs, args = ref.setup(tmp_path_factory.mktemp("tt_attention"))
    m = ref.models(episodes)
    cpu = torch.device("cpu")
    x, _ = tt.sample_batch(data, 1, 2, torch.Generator().manual_seed(0))
    out = {"tt_raw_last_layer": tt_analysis.tt_attention(m["tt"], x)[-1].numpy()}
    controls = (m["dt_control"], m["tt_control"])
    maps = tt_analysis.attention_maps(
        m["dt"], m["tt"], data["disc"], targs, episodes, args, cpu, controls
    )
    out |= {"dt_maps": maps["dt_maps"], "tt_maps": maps["tt_maps"]}
    for name in ("dt_control", "tt_control"):
        out |= {f"{name}_{k}": np.array(maps[name][k]) for k in ("local", "stripe")}
    for beam in (False, True):
        roll = tt_analysis.tt_rollouts(
            m["tt"], data["disc"], targs, info, args, cpu, beam, m["tt_control"]
        )
        out |= ref.stats_arrays(f"tt_{'beam' if beam else 'greedy'}", roll)
    out |= ref.stats_arrays(
        "dt", tt_analysis.dt_rollouts(m["dt"], info, args, cpu, m["dt_control"])
    )
    return out


def test_the_reference_is_peaked_and_complete(new_arrays):
    """The fixed models attend far from uniformly (so a wrong map cannot match by being flat), and
    the new code yields every array the old one did."""
    raw = REFERENCE["tt_raw_last_layer"]
    assert raw.max() > 0.9 and set(REFERENCE) == set(new_arrays)


@pytest.mark.parametrize("key", sorted(REFERENCE))
def test_hooks_reproduce_the_attention_of_return_attn(new_arrays, key):
    # 1e-5: the old explicit softmax fed the next layer, the hooks' model runs scaled_dot_product_
    # attention; the two differ in the last float bits, a wrong map by tenths
    np.testing.assert_allclose(new_arrays[key], REFERENCE[key], rtol=1e-5, atol=1e-6, err_msg=key)
