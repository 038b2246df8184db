"""iem.py --track end to end with the real wandb package (offline: no network, no account): the W&B
run's history is metrics.jsonl, line for line, and its summary holds the final numbers, as in
dt.py's test."""

import json
import struct
from pathlib import Path

import pytest

import iem

LEVEL = "GoToLocalS7N5"


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file (.wandb): a 7-byte header, then LevelDB-log
    blocks of 32 KiB holding (crc32, length, type) records, each a wandb_internal Record
    protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                items = rec.history.item
                rows.append(
                    {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}
                )
    return rows


def test_track_offline_history_equals_metrics_jsonl(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # the [track] extra; CI installs it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    budget = dict(collect=8, updates=6, batch_size=8, eval_episodes=2, log_every=1)
    size = dict(n_layer=1, n_head=2, n_embd=16, horizon=3, iterations=2)
    where = dict(runs_dir=str(tmp_path / "runs"), data_dir=str(tmp_path / "data"), threads=1)
    res = iem.train(iem.Args(env=LEVEL, track=True, **size, **budget, **where))
    wandb.teardown()  # W&B's writer is another process: wait until it has written everything
    run = Path(res["run_dir"])
    (wandb_file,) = run.glob("wandb/offline-run-*/*.wandb")  # synced later with `wandb sync`
    merged = {}  # W&B keeps one row per step: the lines logged at one step, merged
    for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        merged.setdefault(line["step"], {}).update(line)
    history = wandb_history(wandb_file)
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]
    assert rows == [pytest.approx(m) for m in merged.values()] and len(rows) == len(merged) > 3
    assert (
        "iem_success" in rows[-1] and len(rows[-1]["energy"]) == 3
    )  # the final line, energies too
