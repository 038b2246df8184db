"""Writes dt_family_attention_reference.json: the attention arrays of dt.py, mo_dt.py and trdt.py
before issue 29 took `return_attn` and the evaluation's attention callback out of them (commit
5815f1d, where the models returned their weights on request and evaluate() called the callback
that benchmarks/attention.py passed). tests/test_dt_family_attention.py checks that today's hooks
give the same arrays. Kept for the record: it runs only against that commit's method files
(`git worktree add /tmp/old 5815f1d`, then run this file from /tmp/old's tests/).

    python tests/data/dt_family_attention_reference.py OUT.json
"""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]
import attention  # noqa: E402
import common  # noqa: E402
import conftest  # noqa: E402

CLASSES = {"dt": "DecisionTransformer", "mo_dt": "MultiObjectiveDecisionTransformer",
           "trdt": "TrustRegionDecisionTransformer"}  # fmt: skip
# a tiny architecture of every sibling: two blocks of two heads, K = 4
TINY = dict(timestep_embedding=True, context_len=4, n_layer=2, n_head=2, n_embd=16, dropout=0.1,
            max_ep_len=1000, rtg_scale=1000.0)  # fmt: skip
ARCH = {"dt": dict(policy="gaussian"), "mo_dt": dict(gaussian_heads=True),
        "trdt": dict(bins=3, gaussian_heads=True)}  # fmt: skip
SHARPEN = (
    3.0  # the query/key/value weights x3: peaked attention, so that a swapped head or key shows
)


def fixture(tmp: Path):
    """The test suite's hopper-random dataset (tests/conftest.py) and its facts."""
    path = conftest.write_hdf5(tmp / "hopper_random-v2.hdf5", conftest.random_rollouts())
    return common.load_dataset("hopper-random", (str(path),))


def tiny_model(mod, method: str, info: dict):
    """The fixed tiny model of `method`: initialised from seed 0, then sharpened, in eval mode."""
    arch = dict(TINY, **ARCH[method], state_dim=info["obs_dim"], act_dim=info["act_dim"])
    torch.manual_seed(0)
    model = getattr(mod, CLASSES[method])(**arch)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(SHARPEN)
    return model.eval(), arch


def tiny_batch(mod, method: str, episodes: list, arch: dict) -> dict:
    """Two segments of K steps, the first left-padded by two steps (seed 9's draw)."""
    cpu = torch.device("cpu")
    scales = (arch["rtg_scale"], arch["max_ep_len"]) + ((arch["bins"],) if method == "trdt" else ())
    data = mod.make_dataset(episodes, cpu, *scales)
    return mod.sample_batch(data, 2, arch["context_len"], torch.Generator().manual_seed(9))


def save_checkpoint(method: str, model, arch: dict, info: dict, episodes: list, path: Path) -> None:
    """The model as a model.pt that load_checkpoint reads: weights, architecture, dataset facts and
    the dataset's state scale."""
    obs = np.concatenate([ep["observations"] for ep in episodes])
    stats = (torch.as_tensor(obs.mean(0)), torch.as_tensor(obs.std(0) + 1e-6))
    ckpt = {"method": method, "arch": arch, "dataset": info, "model": model.state_dict()}
    torch.save(ckpt | {"state_mean": stats[0], "state_std": stats[1]}, path)


def old_arrays(tmp: Path) -> dict:
    torch.set_num_threads(1)
    episodes, info = fixture(tmp)
    out = {}
    for method in CLASSES:
        mod = __import__(method)
        model, arch = tiny_model(mod, method, info)
        batch = tiny_batch(mod, method, episodes, arch)
        out[f"{method}_batch_mask"] = batch["mask"].numpy()
        with torch.no_grad():
            _, attns = model(batch, return_attn=True)
        for i, att in enumerate(attns):
            out[f"{method}_raw_{i}"] = att.numpy()
        path = tmp / f"{method}.pt"
        save_checkpoint(method, model, arch, info, episodes, path)
        s = attention.record(method, path, 2, "cpu", 0)
        for who, summary in (("eval", s), ("control", s["control"])):
            for key in ("state_row_maps", "modality_mass_per_head", "entropy_per_head", "samples"):
                out[f"{method}_{who}_{key}"] = np.array(summary[key], np.float32)
        out[f"{method}_eval_normalized_mean"] = np.array(s["normalized_mean"])
    return out


if __name__ == "__main__":
    import tempfile

    import reference_arrays  # this folder, on the path when run as a script

    with tempfile.TemporaryDirectory() as tmp:
        reference_arrays.save(sys.argv[1], old_arrays(Path(tmp)))
