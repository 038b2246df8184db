"""benchmarks/rgdt_analysis.py: Fig. 2.2 (state correlation, final-token vs full-context attention) and the decoder
attention of a trained rgdt.py checkpoint."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import rgdt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rgdt_analysis  # noqa: E402


def test_state_correlation_on_a_hand_made_sequence():
    # one dim alternates +1, -1: corr(k) = (-1)^k
    x = np.array([1, -1, 1, -1, 1, -1, 1, -1], np.float64)[:, None]
    corr = rgdt_analysis.state_correlation(x, np.zeros(8, int), np.full(8, 8), 3)
    np.testing.assert_allclose(corr[:, 0], [1, -1, 1, -1])
    # pairs never cross an episode boundary: two episodes (0..3, 4..7) with the same ramp
    ramp = np.array([0, 1, 2, 3, 0, 1, 2, 3], np.float64)[:, None]
    c = rgdt_analysis.state_correlation(ramp, np.repeat([0, 4], 4), np.repeat([4, 8], 4), 1)
    np.testing.assert_allclose(c[1, 0], 1.0)  # (0,1), (1,2), (2,3) twice: perfectly correlated; (3,0) would break it


def test_claims_on_hand_made_summaries():
    def regime(newest_two, entropy):
        return dict(final_row_newest_two=newest_two, final_row_entropy=entropy, uniform_entropy=1.6)

    fig = dict(
        correlation_mean=[1.0, 0.9, 0.8, 0.7],
        attention=dict(full_context=regime(0.8, 1.0), final_token=regime(0.5, 1.5)),
    )
    assert [c["verdict"] for c in rgdt_analysis.fig_2_2_claims(fig, 3)] == ["reproduced", "reproduced"]
    fig = dict(
        correlation_mean=[1.0, 0.9, 0.95, 0.7],
        attention=dict(full_context=regime(0.8, 1.6), final_token=regime(0.5, 1.5)),
    )
    assert [c["verdict"] for c in rgdt_analysis.fig_2_2_claims(fig, 3)] == ["partly", "partly"]
    fig = dict(
        correlation_mean=[1.0, 0.5, 0.9, 0.95],
        attention=dict(full_context=regime(0.4, 1.6), final_token=regime(0.5, 1.5)),
    )
    assert [c["verdict"] for c in rgdt_analysis.fig_2_2_claims(fig, 3)] == ["not reproduced", "not reproduced"]


def tiny(tmp_path, hdf5_path, **kw):
    base = dict(env="hopper-random", dataset_path=(str(hdf5_path),), out=str(tmp_path / "out"), updates=10,
                batch_size=8, eval_episodes=2, log_every=5)  # fmt: skip
    return rgdt_analysis.Args(**{**base, **kw})


def test_fig_2_2_from_a_dataset(tmp_path, hdf5_path, monkeypatch, capsys):
    flags, state_loss = [], rgdt.state_loss  # the indicator each update of the two translators trains with

    def recording_loss(*a):
        flags.append(a[-1])
        return state_loss(*a)

    monkeypatch.setattr(rgdt, "state_loss", recording_loss)
    res = rgdt_analysis.main(tiny(tmp_path, hdf5_path))
    assert flags == [False] * 10 + [True] * 10  # one translator of each kind
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"fig2_2.png", "fig2_2.json", "metrics.jsonl"}
    assert (out / "fig2_2.png").stat().st_size > 0
    fig = json.loads((out / "fig2_2.json").read_text())
    assert fig["correlation_mean"][0] == pytest.approx(1.0) and len(fig["correlation_mean"]) == 21  # k = 0..K_r
    for regime in ("final_token", "full_context"):
        maps = np.array(fig["attention"][regime]["self_maps"])
        assert maps.shape == (3, 5, 5) and np.allclose(maps.sum(-1), 1.0, atol=1e-5)  # §2.4's 3 decoder layers
    # same init, same batches: only the indicator differs, and it must change what the decoder attends to
    assert not np.allclose(fig["attention"]["final_token"]["self_maps"], fig["attention"]["full_context"]["self_maps"])
    assert {c["verdict"] for c in res["claims"]} <= {"reproduced", "partly", "not reproduced"} and len(
        res["claims"]
    ) == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["phase"] == "analyze_full_context"] == [0, 5, 9]
    printed = capsys.readouterr().out
    assert "| thesis claim" in printed and "Fig. 2.2a: state correlation decreases" in printed
    before = (out / "fig2_2.json").read_text()
    with pytest.raises(SystemExit, match="holds files; .* --force"):
        rgdt_analysis.main(tiny(tmp_path, hdf5_path))
    assert (out / "fig2_2.json").read_text() == before  # never overwritten
    rgdt_analysis.main(tiny(tmp_path, hdf5_path, force=True))  # unless asked: a new log, not one appended to
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["phase"] == "analyze_full_context"] == [0, 5, 9]


def test_attention_of_a_checkpoint(tmp_path, hdf5_path):
    args = dict(env="hopper-random", dataset_path=(str(hdf5_path),), updates=6, inv_updates=4, batch_size=8, n_embd=32,
                n_enc_layer=1, n_layer=2, n_head=2, inv_hidden=32, eval_every=0, eval_episodes=2,
                runs_dir=str(tmp_path / "runs"))  # fmt: skip
    trained = rgdt.train(rgdt.Args(**args))
    ckpt = str(Path(trained["run_dir"]) / "model.pt")
    res = rgdt_analysis.main(
        rgdt_analysis.Args(checkpoint=ckpt, out=str(tmp_path / "a"), updates=4, batch_size=8, eval_episodes=2)
    )
    out = tmp_path / "a"
    assert {p.name for p in out.iterdir()} == {
        "fig2_2.png",
        "fig2_2.json",
        "metrics.jsonl",
        "attention.png",
        "attention.json",
    }
    att = json.loads((out / "attention.json").read_text())
    # same weights, same env seeds -> the same episodes, up to float noise: the analysis evaluates in fp32 with an
    # explicit softmax, the run's own evaluation in bf16 where the CPU has it (AMX, AVX512-BF16) or on CUDA
    rel = 1e-2 if trained["bf16"] else 1e-4
    assert att["returns"] == pytest.approx(trained["returns"], rel=rel)
    self_maps, cross = np.array(att["self_maps"]), np.array(att["cross_maps"])
    assert self_maps.shape == (2, 5, 5) and cross.shape == (2, 5, 20)  # the checkpoint's architecture
    assert np.allclose(np.triu(self_maps, 1), 0) and np.allclose(cross.sum(-1), 1.0, atol=1e-5) and att["samples"] > 0
    assert np.array(res["attention"]["final_token"]["self_maps"]).shape == (2, 5, 5)  # Fig. 2.2 at its size too


def test_bad_flags_are_named(tmp_path, hdf5_path):
    with pytest.raises(SystemExit, match="--updates 0: must be > 0"):
        tiny(tmp_path, hdf5_path, updates=0)
    with pytest.raises(SystemExit, match="no such file"):
        rgdt_analysis.main(tiny(tmp_path, hdf5_path, checkpoint=str(tmp_path / "none.pt")))
    assert not (tmp_path / "out").exists()
