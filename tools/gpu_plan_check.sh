#!/usr/bin/env bash
# Planned HBM (`dinrec plan`, 1 GPU) against torch.cuda.max_memory_allocated after training steps
# with that plan, on a GPU machine (PYTHONPATH = the torchrec/fbgemm bundle and the project).
# Writes $OUT/plan_check.json.
set -eu
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
dinrec() { python3 -c "import sys; from launch.cli import main; sys.exit(main(sys.argv[1:]))" "$@"; }
dinrec generate --out /tmp/plan_check --users 3000 --items 5000 --no-progress > /dev/null
dinrec plan --config configs/plan_gpu_check.yaml --world-size 1 --compute-device cuda --hbm 80GiB \
  --out /tmp/plan_check/plan.json > "$OUT/plan_check_plan.txt"
dinrec train --config configs/plan_gpu_check.yaml --plan /tmp/plan_check/plan.json --no-progress \
  2> "$OUT/plan_check_train.err" | tail -1 > "$OUT/plan_check_train.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
plan = json.load(open("/tmp/plan_check/plan.json"))
train = json.load(open(f"{out}/plan_check_train.json"))
planned, real = plan["ranks"][0]["hbm_bytes"], train["cuda_max_memory_allocated"]
r = {"planned_hbm_bytes": planned, "of_which_tables": plan["ranks"][0]["table_bytes"], "dense_bytes": plan["dense_bytes"],
     "cuda_max_memory_allocated": real, "ratio_real_over_planned": round(real / planned, 3)}
json.dump(r, open(f"{out}/plan_check.json", "w"))
print(json.dumps(r))
PY
