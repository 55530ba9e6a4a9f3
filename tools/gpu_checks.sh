#!/usr/bin/env bash
# The GPU checks, in one call on the device machine (see ../shared/device/README.md for bringing
# torchrec 1.6.1 + fbgemm-gpu 1.6.0 there). Run from the project root with PYTHONPATH set to the
# bundle and the project; results go to $OUT (default /tmp/gpu-out):
#   gpu.txt               the device
#   pytest_gpu.txt        the CUDA tests: Triton MBA kernel vs numpy Eq. 7, MBA inside torchrec
#                         (NCCL, world size 1, table/row/column/table-row-wise), λ=0 vs FBGEMM
#   bench_embedding.json  dinrec bench embedding on the GPU (Triton kernel); .err: its profile
#   din_mba_gpu.json      a tiny DIN run with sgd_mba on the GPU, end to end
#   pytest_dien_gpu.txt   DIEN's GRU kernel on CUDA against the step loop
#   bench_dien_gpu.json   dinrec bench dien --device cuda at batch 4096
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, torchrec, fbgemm_gpu; print('torch', torch.__version__, 'triton', triton.__version__, 'torchrec', torchrec.__version__, 'fbgemm_gpu', fbgemm_gpu.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

timeout 240 python3 -m pytest -q -p no:cacheprovider -k cuda \
  tests/embedding/test_mba.py tests/embedding/test_mba_torchrec.py > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu.txt"
tail -5 "$OUT/pytest_gpu.txt"

timeout 150 python3 -m tools.bench_embedding embedding --device cuda --kernels auto --steps 50 --warmup 5 --profile \
  > "$OUT/bench_embedding.json" 2> "$OUT/bench_embedding.err"
cat "$OUT/bench_embedding.json"; tail -3 "$OUT/bench_embedding.err"

timeout 100 python3 - > "$OUT/din_mba_gpu.json" 2> "$OUT/din_mba_gpu.err" <<'EOF'
import json, os
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
from pathlib import Path
from tools.generate import WorldSpec, generate
from trainer.config import load_config
from trainer.loop import train
generate(WorldSpec(users=300, items=500, cates=20, impressions_per_user=10, test_per_user=3, hist_max=30, seed=3),
         Path("/tmp/tiny"), train_files=3, test_files=2, row_group_size=256, progress=False)
cfg = load_config("configs/tiny.yaml", ["data.train=/tmp/tiny/train", "data.test=/tmp/tiny/test", "launch.use_gpu=true",
                                        "train.out_dir=/tmp/runs/gpu_mba", "sparse_optimizer.type=sgd_mba",
                                        "sparse_optimizer.lambda=0.01"])
print(json.dumps(train(cfg, progress=False)))
EOF
cat "$OUT/din_mba_gpu.json"; tail -3 "$OUT/din_mba_gpu.err"

# DIEN: the GRU sequence kernel's ATen path on CUDA against the step loop, then the training step
# at batch 4096 (DIN, DIEN, DIEN with the step loop) on the default synthetic data
timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda tests/trainer/test_dien.py > "$OUT/pytest_dien_gpu.txt" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_dien_gpu.txt"
tail -3 "$OUT/pytest_dien_gpu.txt"
timeout 60 python3 -m launch.cli generate --out /tmp/synthetic --no-progress > /dev/null 2>&1
timeout 240 python3 -m launch.cli bench dien --config configs/dien_synthetic.yaml --device cuda --steps 30 --warmup 3 \
  data.batch_size=4096 "data.train=/tmp/synthetic/train/*.parquet" > "$OUT/bench_dien_gpu.json" 2> "$OUT/bench_dien_gpu.err"
tail -1 "$OUT/bench_dien_gpu.json"
