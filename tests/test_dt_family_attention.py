"""benchmarks/attention.py captures the DT family's attention with forward hooks (issue 29 item 4:
no analysis path in the models or evaluate()). On a fixed tiny model of each sibling it gives the
arrays the old path gave (models returning their weights, evaluate() calling a callback; commit
5815f1d), saved in tests/data/dt_family_attention_reference.json by
tests/data/dt_family_attention_reference.py."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "data")]
import attention  # noqa: E402
import dt_family_attention_reference as reference  # noqa: E402
import reference_arrays  # noqa: E402

# fp32 on one thread. Block 1 on differs by a few ulps: the old path's block 0 mixed the values
# with its own softmax, today's with the fused kernel the training uses.
TOL = dict(rtol=1e-5, atol=1e-6)
KEYS = ("state_row_maps", "modality_mass_per_head", "entropy_per_head", "samples")


@pytest.fixture(scope="module")
def saved():
    return reference_arrays.load(ROOT / "tests" / "data" / "dt_family_attention_reference.json")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return reference.fixture(tmp_path_factory.mktemp("attention"))


@pytest.mark.parametrize("method", list(reference.CLASSES))
def test_hooks_give_the_old_attention_arrays(method, saved, fixture, tmp_path):
    torch.set_num_threads(1)
    episodes, info = fixture
    mod = __import__(method)
    model, arch = reference.tiny_model(mod, method, info)
    batch = reference.tiny_batch(mod, method, episodes, arch)
    assert batch["mask"].tolist() == saved[f"{method}_batch_mask"].tolist()  # padding included
    with torch.no_grad():
        _, attns = attention.forward_attention(model, batch)
    assert len(attns) == 2
    for i, att in enumerate(attns):
        np.testing.assert_allclose(att.numpy(), saved[f"{method}_raw_{i}"], **TOL)
    path = tmp_path / "model.pt"
    reference.save_checkpoint(method, model, arch, info, episodes, path)
    s = attention.record(method, path, 2, "cpu", 0)
    assert s["samples"] > 0
    for who, summary in (("eval", s), ("control", s["control"])):
        for key in KEYS:
            ours = np.array(summary[key], np.float32)
            np.testing.assert_allclose(ours, saved[f"{method}_{who}_{key}"], **TOL, err_msg=key)
    assert s["normalized_mean"] == pytest.approx(float(saved[f"{method}_eval_normalized_mean"]))


def test_the_recomputed_weights_reproduce_each_blocks_output():
    """The hook's softmax(QK^T/sqrt(d) + mask) times V, projected, is what the fused kernel gave
    (the test can fail: a transposed or unmasked map gives another output)."""
    torch.manual_seed(0)
    attn = __import__("trdt").SelfAttention(16, 2, 0.0).eval()
    x = torch.randn(2, 8, 16)
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    att = attention.attention_weights(attn, x, allowed)
    v = attn.qkv(x).split(16, dim=2)[2].view(2, 8, 2, 8).transpose(1, 2)
    y = attn.proj((att @ v).transpose(1, 2).reshape(2, 8, 16))
    torch.testing.assert_close(y, attn(x, allowed), rtol=1e-5, atol=1e-6)
    transposed = attn.proj((att.transpose(-2, -1) @ v).transpose(1, 2).reshape(2, 8, 16))
    assert not torch.allclose(transposed, y, atol=1e-3)
