#!/usr/bin/env bash
# One device check on a lent GPU machine (issue "Speed on the machines users have"), in one call of at most
# ~9 minutes: training updates/s of every method at its default and Table 1.1 size (bf16, with and without
# --compile), evaluation env-steps/s (10 episodes at once against one at a time), and a short DT / MO-DT / TRDT
# run on the hopper-medium-replay replica side by side (an evaluation every 2500 updates), each stopped at its
# time limit by Ctrl-C (SIGINT), which the method files answer by saving the model; every logged metric is kept.
#
#   bash benchmarks/device_check.sh OUT_DIR DATA_DIR          # on the GPU machine (the device tool's $OUT)
#   DRY_RUN=1 bash benchmarks/device_check.sh OUT_DIR DATA_DIR # the same steps on a CPU, tiny (CI runs this)
#
# DATA_DIR holds hopper-medium-replay.hdf5 (the replica's name). Python packages the machine lacks travel as
# wheels in .whl/ (see README, "A GPU check"); they are installed first when that folder exists.
# Writes OUT_DIR/device_check.json (and the raw speed JSON and metrics beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: device_check.sh OUT_DIR DATA_DIR}
DATA_DIR=${2:?usage: device_check.sh OUT_DIR DATA_DIR}
DATA="$DATA_DIR/hopper-medium-replay.hdf5"
[ -f "$DATA" ] || { echo "error: $DATA: no such file; put the replica's hopper-medium-replay.hdf5 there." >&2; exit 2; }
mkdir -p "$OUT_DIR"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 3
fi
export MPLBACKEND=Agg PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu; SPEED_UPDATES=2; RUN_S=30; EVAL_EVERY=20; METHODS="dt"; CONFIGS=(--configs default --eval-episodes 2)
  SIZE=(--n-layer 1 --n-head 1 --n-embd 16 --batch-size 8 --eval-episodes 2 --warmup-steps 5 --threads 1)
else
  DEVICE=cuda; SPEED_UPDATES=200; RUN_S=${RUN_S:-100}; EVAL_EVERY=2500; METHODS="dt mo_dt trdt rgdt"; CONFIGS=()
  SIZE=(--eval-episodes 10)
fi
t0=$(date +%s)
python3 -c "import torch, json; print(json.dumps(dict(torch=torch.__version__, cuda=torch.cuda.is_available(),
  gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)))" > "$OUT_DIR/device.json"

# 1. speed: updates/s per method, config and precision; evaluation env-steps/s, vectorized against one at a time
python3 benchmarks/speed.py --data-dir "$DATA_DIR" --dataset hopper-medium-replay --device "$DEVICE" \
  --updates "$SPEED_UPDATES" --methods $METHODS "${CONFIGS[@]}" --out-dir "$OUT_DIR" > "$OUT_DIR/speed.log" 2>&1
echo "speed: exit $? ($(( $(date +%s) - t0 )) s)"

# 2. DT, MO-DT, TRDT side by side on the replica, each stopped at its time limit with Ctrl-C (saves the model)
for m in dt mo_dt trdt; do
  timeout -s INT "$RUN_S" python3 "$m.py" --env hopper-medium-replay --dataset-path "$DATA" --device "$DEVICE" \
    --eval-every "$EVAL_EVERY" --runs-dir "$OUT_DIR/runs" --exp-name "$m" --updates 100000 "${SIZE[@]}" \
    > "$OUT_DIR/$m.log" 2>&1
  echo "$m: exit $? ($(( $(date +%s) - t0 )) s)"
done

# 3. one JSON: the device, the speed rows, and every metric each run logged before it was stopped
python3 - "$OUT_DIR" "$t0" <<'EOF'
import json, sys, time
from pathlib import Path

out, t0 = Path(sys.argv[1]), float(sys.argv[2])
speed = sorted(out.glob("speed__*.json"))
runs = {}
for folder in sorted((out / "runs").glob("*")):
    if not (folder / "metrics.jsonl").exists():  # stopped before its first evaluation finished
        runs[folder.name] = dict(error="stopped before anything was logged; give it more time (RUN_S)")
        continue
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [m for m in lines if "loss" in m]
    runs[folder.name] = dict(
        evaluations=[m for m in lines if "eval_normalized" in m], updates_logged=losses[-1]["step"] + 1 if losses else 0,
        model_saved=(folder / "model.pt").exists(), config=json.loads((folder / "config.json").read_text()))
report = dict(device=json.loads((out / "device.json").read_text()),
              speed=json.loads(speed[-1].read_text()) if speed else None, runs=runs, wall_time_s=time.time() - t0,
              data="replica (not D4RL): hopper-medium-replay")
(out / "device_check.json").write_text(json.dumps(report, indent=1))
print(f"wrote {out / 'device_check.json'}: {len(runs)} runs, speed rows {len(report['speed']['rows']) if speed else 0}")
EOF
