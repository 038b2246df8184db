#!/usr/bin/env bash
# The GPU check (issue 28, items 6 and 8), in calls of at most 8 minutes each. Every call writes ONE
# JSON, OUT_DIR/device_check.json, after each measurement, plus a log and one training run's folder,
# and goes on where the last call stopped: measurements already in the JSON are skipped, the
# training run is resumed.
#
#   bash benchmarks/device_check.sh [PART] OUT_DIR DATA_DIR     # on the GPU machine ($OUT)
#   DRY_RUN=1 bash benchmarks/device_check.sh OUT_DIR DATA_DIR  # the same steps on a CPU, tiny (CI)
#
# PART (default all): speed, compile or train, or all three in this order until the budget is spent.
#   speed    dt, mo_dt and trdt at Table 1.1 size, eager fp32 and eager bf16 (benchmarks/speed.py);
#            with the fp32 row, the evaluation of 10 episodes at once against one at a time
#   compile  the same with --compile, and as a CUDA graph (recorded "not supported by this code"
#            where the method file has no flag for it); the compile time apart from the updates/s
#   train    DT at the DT paper's size (dt.py's defaults) on the replica hopper-medium-replay, as
#            many updates as the time left allows, stopped by SIGINT (dt.py saves it), resumed
#            by the next call
# BUDGET_S (default 450) bounds the call: no step starts that cannot end inside it.
# DATA_DIR holds hopper-medium-replay.hdf5 (the replica's name) and, for the speed rows, ideally
# halfcheetah-medium-replay.hdf5 (its episodes never end early; without it hopper is timed). Give
# DATA_DIR relative to the repository root: the next machine then finds the saved run's data again.
# To go on from an earlier call, put its files back into OUT_DIR, or name their folder in FROM=DIR.
# Python packages the machine lacks travel as wheels in .whl/ (see README), installed first.
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
PART=all
case "${1:-}" in all | speed | compile | train) PART=$1; shift ;; esac
usage="usage: device_check.sh [all|speed|compile|train] OUT_DIR DATA_DIR"
OUT_DIR=${1:?$usage}
DATA_DIR=${2:?$usage}
DATA="$DATA_DIR/hopper-medium-replay.hdf5"
if [ ! -f "$DATA" ]; then
  echo "error: $DATA: no such file; put the replica's hopper-medium-replay.hdf5 there." >&2
  exit 2
fi
SPEED_SET=hopper-medium-replay
[ -f "$DATA_DIR/halfcheetah-medium-replay.hdf5" ] && SPEED_SET=halfcheetah-medium-replay
mkdir -p "$OUT_DIR" || exit 2
if [ -n "${FROM:-}" ]; then cp -rn "$FROM"/. "$OUT_DIR"/ || exit 3; fi
JSON="$OUT_DIR/device_check.json"
LOG="$OUT_DIR/device_check.log"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then
  # compiling on a CPU takes minutes: the dry run leaves the compile part out
  DEVICE=cpu; BUDGET_S=${BUDGET_S:-60}; RESERVE_S=15; MIN_TRAIN_S=8; METHODS=(dt); UPDATES=2
  EAGER=(fp32); COMPILED=()
  TINY="--n-layer 1 --n-head 1 --n-embd 16 --batch-size 8 --threads 1"
  SPEED_FLAGS=("--extra-flags=$TINY" --eval-episodes 2)
  TRAIN=($TINY --eval-every 400 --eval-episodes 2 --warmup-steps 5); SAVE_EVERY=200
else
  DEVICE=cuda; BUDGET_S=${BUDGET_S:-450}; RESERVE_S=45; MIN_TRAIN_S=60; METHODS=(dt mo_dt trdt)
  UPDATES=${SPEED_UPDATES:-200}; EAGER=(fp32 bf16); COMPILED=("bf16 + compile" "bf16 + CUDA graph")
  SPEED_FLAGS=(--eval-episodes 10)
  TRAIN=(--eval-every 10000 --eval-episodes 10); SAVE_EVERY=5000
fi
left() { echo $((BUDGET_S - ($(date +%s) - T0) - RESERVE_S)); }
echo "== $(date -u +%FT%TZ) device_check $PART on $DEVICE, budget ${BUDGET_S}s" >>"$LOG"

# speed rows, resumable: speed.py keeps and skips what the JSON holds, and stops at its budget
speed_part() { # $@: precisions
  (($# > 0)) || return 0
  local budget
  budget=$(left)
  ((budget > 10)) || { echo "$PART: no time left for $*" | tee -a "$LOG"; return 0; }
  local single=(--single)
  [ "$1" = "${EAGER[0]}" ] || single=(--no-single)
  python3 benchmarks/speed.py --data-dir "$DATA_DIR" --dataset "$SPEED_SET" --device "$DEVICE" \
    --updates "$UPDATES" --methods "${METHODS[@]}" --configs "thesis size" "default = Table" \
    --precisions "$@" "${single[@]}" "${SPEED_FLAGS[@]}" --out "$JSON" --budget-s "$budget" \
    >>"$LOG" 2>&1
  echo "speed ($*): exit $? ($(($(date +%s) - T0)) s)" | tee -a "$LOG"
}

# The JSON's `train` entry: the run folder (relative to OUT_DIR), the updates its model.pt holds and
# its evaluations; a stopped call adds its share (seconds, updates gained). $1: running or stopped.
record_train() {
  python3 - "$JSON" "$OUT_DIR" "$1" "${2:-}" "${3:-0}" "${4:-0}" <<'PY'
import json, os, sys
from pathlib import Path

path, out, state, run, rc, seconds = Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:]
report = json.loads(path.read_text()) if path.exists() else {}
what = "dt.py's defaults (the DT paper's size) on replica hopper-medium-replay (not D4RL)"
train = report.setdefault("train", {"what": what, "calls": []})
saved = None
if run:
    folder = out / run
    metrics = folder / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    train |= dict(run=run, evaluations=[m for m in lines if "eval_normalized" in m],
                  finished=(folder / "results.json").exists())
    if (folder / "model.pt").exists():
        import torch

        ckpt = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
        saved = ckpt["trained_updates"]
train["state"], train["updates_saved"] = state, saved
if state == "running":
    train["updates_at_start"] = saved or 0
else:
    gained = (saved or 0) - train.get("updates_at_start", 0)
    train["calls"].append(dict(exit=int(rc), seconds=float(seconds), updates_gained=gained,
                               updates_per_s_with_evaluations=gained / max(float(seconds), 1.0)))
tmp = path.with_name(path.name + ".tmp")
tmp.write_text(json.dumps(report, indent=1))
os.replace(tmp, path)
print(f"train: {state}, {saved} updates saved in {run or 'no run yet'}")
PY
}

newest_run() { (cd "$OUT_DIR" && ls -td runs/*__dt-device-check__* 2>/dev/null | head -1); }

train_part() {
  local budget run cmd help
  budget=$(left)
  # an unfinished run of an earlier call: the one the JSON names, else (a killed call) the newest
  run=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['train']['run'])" "$JSON" \
    2>/dev/null)
  [ -n "$run" ] && [ -d "$OUT_DIR/$run" ] || run=$(newest_run)
  if [ -n "$run" ] && [ -f "$OUT_DIR/$run/results.json" ]; then
    echo "train: $run has finished" | tee -a "$LOG"
    return 0
  fi
  ((budget >= MIN_TRAIN_S)) || { echo "train: not started, ${budget}s left" >>"$LOG"; return; }
  help=$(python3 dt.py --help 2>&1)
  if [ -n "$run" ] && [ -f "$OUT_DIR/$run/model.pt" ] && grep -q -- --resume <<<"$help"; then
    cmd=(python3 dt.py --resume "$OUT_DIR/$run" --device "$DEVICE")
  else
    [ -n "$run" ] && echo "train: $run cannot be resumed (no model.pt, or no --resume): a new run" \
      | tee -a "$LOG"
    grep -q -- --save-every <<<"$help" && TRAIN+=(--save-every "$SAVE_EVERY")
    cmd=(python3 dt.py --env hopper-medium-replay --dataset-path "$DATA" --device "$DEVICE"
      --updates 100000 --runs-dir "$OUT_DIR/runs" --exp-name dt-device-check "${TRAIN[@]}")
    run=""
  fi
  record_train running "$run" >>"$LOG"
  local t rc
  t=$(date +%s)
  budget=$(left) # what is left now; RESERVE_S covers the save after SIGINT and the records after it
  ((budget >= MIN_TRAIN_S)) || { echo "train: not started, ${budget}s left" >>"$LOG"; return; }
  timeout -s INT -k 30 "$budget" "${cmd[@]}" >>"$LOG" 2>&1 # SIGINT: dt.py saves model.pt, stops
  rc=$?
  [ -n "$run" ] || run=$(newest_run)
  record_train stopped "$run" "$rc" "$(($(date +%s) - t))" | tee -a "$LOG"
}

case "$PART" in
  speed) speed_part "${EAGER[@]}" ;;
  compile) speed_part "${COMPILED[@]}" ;;
  train) train_part ;;
  all)
    speed_part "${EAGER[@]}"
    speed_part "${COMPILED[@]}"
    train_part
    ;;
esac

# this call, appended to the JSON's list of calls, with the machine it ran on
python3 - "$JSON" "$PART" "$T0" "$BUDGET_S" "${DRY_RUN:-0}" <<'PY'
import json, os, sys, time
from pathlib import Path

import torch

path, part, t0, budget, dry = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), *sys.argv[4:]
report = json.loads(path.read_text()) if path.exists() else {}
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
report.setdefault("calls", []).append(
    dict(part=part, budget_s=float(budget), seconds=time.time() - t0, dry_run=dry == "1", gpu=gpu,
         torch=torch.__version__, ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
report["data"] = "replica (not D4RL)"
tmp = path.with_name(path.name + ".tmp")
tmp.write_text(json.dumps(report, indent=1))
os.replace(tmp, path)
states = sorted({r["status"] for r in report.get("rows", [])})
saved = report.get("train", {}).get("updates_saved")
print(f"wrote {path}: {len(report.get('rows', []))} speed rows ({', '.join(states)}), "
      f"train: {saved} updates saved, {time.time() - t0:.0f} s")
PY
