"""Issue 29 item 4: iem.py's model path takes no `return_attn`; benchmarks/iem_analysis.py records
attention with hooks. Its arrays must be those the analysis produced before the change (recorded
at commit 7acb83d by tests/data/iem_attention_reference.py) on the same fixed tiny models and
inputs."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "data"), str(ROOT / "benchmarks")]
import iem_analysis  # noqa: E402
import iem_attention_reference as ref  # noqa: E402
import reference_arrays  # noqa: E402

OLD = reference_arrays.load(ROOT / "tests" / "data" / "iem_attention_reference.json")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference was recorded
    yield
    torch.set_num_threads(threads)


def test_hooks_record_the_weights_return_attn_gave(tmp_path):
    model, _ = ref.models()
    images, words, copies = iem_analysis.plan_inputs(model, ref.run_args(tmp_path), ref.ARCH, 2, 0)
    assert np.array_equal(copies.numpy(), OLD["copies"])  # the same plans: the same inputs
    with torch.no_grad(), iem_analysis.recorded_attention(model) as attns:
        logits = model(images, words, copies, copies=ref.ARCH["horizon"])
    assert len(attns) == ref.ARCH["n_layer"]
    for i, att in enumerate(attns):
        np.testing.assert_allclose(att.numpy(), OLD[f"raw_{i}"], rtol=1e-5, atol=1e-7)
    # the hooks leave the model as it was: no hook after the block, the same logits without one
    assert not any(b.attn._forward_hooks or b.attn._forward_pre_hooks for b in model.blocks)
    with torch.no_grad():
        again = model(images, words, copies, copies=ref.ARCH["horizon"])
    torch.testing.assert_close(again, logits, rtol=1e-5, atol=1e-6)


def test_the_analysis_summaries_are_unchanged(tmp_path):
    model, control = ref.models()
    s = iem_analysis.attention(
        model, ref.run_args(tmp_path), ref.ARCH, ref.STATES, ref.SEED, control
    )
    new = ref.flatten(s, "ours") | ref.flatten(s["control"], "control")
    assert set(new) == {k for k in OLD if k.startswith(("ours_", "control_"))}
    for k, v in new.items():
        np.testing.assert_allclose(v, OLD[k], rtol=1e-5, atol=1e-7, equal_nan=True, err_msg=k)
    # peaked maps (uniform rows over the 9 real keys would be 0.11 each): a wrong recording cannot
    # pass by being uniform
    assert np.nanmax(OLD["ours_layers"]) > 0.4
