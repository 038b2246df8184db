"""benchmarks/ops.py: aten ops per training update, per phase, on the tiny config (seconds)."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ops  # noqa: E402


def test_tiny_counts_of_dt_and_mo_dt_add_up_per_phase(tmp_path):
    ops.main(ops.Args(methods=("dt", "mo_dt"), config="tiny", out=str(tmp_path)))
    report = json.loads((tmp_path / "ops.json").read_text())
    assert report["config"] == "tiny" and report["torch"] == torch.__version__ and report["cpu"]
    assert [r["method"] for r in report["rows"]] == ["dt", "mo_dt"]
    for row in report["rows"]:
        assert row["parameter_tensors"] > 0 and row["flags"]["n_layer"] == 1  # the tiny config ran
        for key in ("cpu", "cuda_defaults"):
            c = row[key]
            assert set(c["phases"]) == set(ops.PHASES)
            assert c["total"] == sum(c["phases"].values())
            assert c["launching_total"] == sum(c["launching"].values()) <= c["total"]
            for phase in ("forward", "backward", "clip", "optimizer"):  # both files clip
                assert c["phases"][phase] > 0, (row["method"], key, phase)
            assert c["sample"] > 0  # sample_batch, counted apart from the update
        # the DT family's forward on CUDA: F.dropout and SDPA, not the CPU's own dropout masks
        assert row["cuda_defaults"]["phases"]["forward"] < row["cpu"]["phases"]["forward"]
    table = (tmp_path / "ops.md").read_text()
    assert "| dt | AdamW |" in table and "| mo_dt |" in table


def test_tiny_counts_of_rgdt_s_two_models(tmp_path):
    """The translator and the inverse dynamics each get a row (the translator's forward once
    unpacked a third, attention, output: the row broke without a test)."""
    ops.main(ops.Args(methods=("rgdt",), config="tiny", out=str(tmp_path)))
    rows = json.loads((tmp_path / "ops.json").read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        phases = row["cpu"]["phases"]
        assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0


def test_phases_of_a_known_update_and_cuda_s_kernel_choice():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters())  # leaves the kernel choice to torch
    x = torch.randn(16, 4)

    def step():
        loss = model(x).pow(2).mean()  # 5 top-level ops: linear, relu, linear, pow, mean
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    h = ops.Harness(step, model, opt, module=types.SimpleNamespace(), flags={})
    backward = torch.Tensor.backward
    cpu, cuda = ops.count_update(h, 1, as_cuda=False), ops.count_update(h, 1, as_cuda=True)
    assert cpu["phases"]["forward"] == cuda["phases"]["forward"] == 5
    assert cpu["phases"]["zero_grad"] == 0 and cpu["sample"] == 0
    assert cpu["phases"]["backward"] == cuda["phases"]["backward"] > 0
    assert cpu["phases"]["clip"] == cuda["phases"]["clip"] > 0
    # a loop over the 4 tensors on a CPU (several kernels each), foreach kernels for all on CUDA
    looped, foreach = cpu["launching"]["optimizer"], cuda["launching"]["optimizer"]
    assert looped >= 4 * 4 and 2 * foreach < looped
    assert torch.Tensor.backward is backward and "step" not in vars(opt)  # every mark removed


def test_only_top_level_ops_count_and_views_launch_nothing():
    x, w = torch.ones(4, 3), torch.ones(5, 3)
    with profile() as prof:
        with record_function(ops.TAG + "forward"):
            y = F.linear(x, w)  # one top-level op (its t and addmm inside are not counted)
            y = y.view(-1).add(1)  # a view and an add
    t = ops.tally(prof.events())
    assert t["counts"]["forward"] == 3 and t["launching"]["forward"] == 2
    assert dict(t["names"]["forward"]) == {"aten::linear": 1, "aten::view": 1, "aten::add": 1}


def test_default_out_is_a_new_folder_under_runs_and_nothing_is_overwritten(tmp_path, monkeypatch):
    monkeypatch.setattr(ops, "ROOT", tmp_path)
    ops.main(ops.Args(methods=("bc",), config="tiny"))
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("ops__tiny__") and (folder / "ops.md").exists()
    before = (folder / "ops.json").read_text()
    with pytest.raises(SystemExit, match="--force"):
        ops.main(ops.Args(methods=("bc",), config="tiny", out=str(folder)))
    assert (folder / "ops.json").read_text() == before
    with pytest.raises(SystemExit, match="--methods nope: choose from"):
        ops.main(ops.Args(methods=("nope",), config="tiny", out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
