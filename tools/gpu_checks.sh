#!/usr/bin/env bash
# The GPU checks, in one call on a GPU machine with torchrec 1.6.1 + fbgemm-gpu 1.6.0 importable.
# Run from the project root with PYTHONPATH set to the
# bundle and the project: `bash tools/gpu_checks.sh [SECTION ...]` (default: all, in this order:
# mba dien e2e checkpoint); results go to $OUT (default /tmp/gpu-out):
#   dien:        pytest_dien_gpu.txt   DIEN's GRU kernels on CUDA (the Triton one compiled, the C++ one's ATen
#                                      path) against the step loop
#                bench_dien_gpu.json   dinrec bench dien --device cuda at batch 4096 (Triton kernel; the
#                                      C++ kernel's ATen path and the step loop in the same run)
#   e2e:         e2e_w{0,4,8}.json     dinrec bench e2e --device cuda, DIN at batch 4096: Parquet-fed through the
#                                      pipeline with 0, 4, 8 loader workers vs in-memory batches, GPU busy share
#                e2e_mba_w8.json       the same with sgd_mba, 8 loader workers
#   checkpoint:  checkpoint_gpu.json   exact resume after a kill on the GPU (tensors compared with the
#                                      uninterrupted run), a checkpoint loaded under another plan
#                                      (same eval), write/load time and size with a 1e8-row table
#   mba:         pytest_gpu.txt        the CUDA tests: Triton MBA kernels vs numpy Eq. 7, the MBA module vs
#                                      FBGEMM (lookup, λ = 0 step), MBA inside
#                                      torchrec (NCCL, world size 1, table/row/column/table-row-wise)
#                bench_embedding.json  dinrec bench embedding on the GPU (Triton kernel); .err: profile
#                din_mba_gpu.json      a tiny DIN run with sgd_mba on the GPU, end to end
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 GLOO_SOCKET_IFNAME=lo
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, torchrec, fbgemm_gpu; print('torch', torch.__version__, 'triton', triton.__version__, 'torchrec', torchrec.__version__, 'fbgemm_gpu', fbgemm_gpu.__version__)" >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
TINY=/tmp/tiny
python3 -c "
from pathlib import Path
from tools.generate import WorldSpec, generate
generate(WorldSpec(users=300, items=500, cates=20, impressions_per_user=10, test_per_user=3, hist_max=30, seed=3),
         Path('$TINY'), train_files=3, test_files=2, row_group_size=256, progress=False)"

synthetic() {  # the default synthetic data, once
  [ -f /tmp/synthetic/train/_SUCCESS ] || timeout 60 python3 -m launch.cli generate --out /tmp/synthetic --no-progress > /dev/null 2>&1
}

dien() {  # the GRU sequence kernels on CUDA against the step loop; the training step at batch 4096
  timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda tests/trainer/test_dien.py > "$OUT/pytest_dien_gpu.txt" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest_dien_gpu.txt"
  tail -3 "$OUT/pytest_dien_gpu.txt"
  synthetic
  timeout 200 python3 -m launch.cli bench dien --config configs/dien_synthetic.yaml --device cuda --steps 20 --warmup 3 \
    data.batch_size=4096 "data.train=/tmp/synthetic/train/*.parquet" > "$OUT/bench_dien_gpu.json" 2> "$OUT/bench_dien_gpu.err"
  tail -1 "$OUT/bench_dien_gpu.json"; tail -2 "$OUT/bench_dien_gpu.err"
}

checkpoint() {  # see the header; one GPU, NCCL world size 1
  timeout 280 python3 - > "$OUT/checkpoint_gpu.json" 2> "$OUT/checkpoint_gpu.err" <<'PY'
import json, os, subprocess, sys
import torch
from trainer import checkpoint

base = ["--config", "configs/tiny.yaml", "--no-progress", "data.train=/tmp/tiny/train", "data.test=/tmp/tiny/test",
        "launch.use_gpu=true", "sparse_optimizer.type=rowwise_adagrad_mba", "sparse_optimizer.lambda=0.01",
        "sparse_optimizer.counts=online", "model.id_dropout=0.1", "train.checkpoint_every=5", "train.keep_checkpoints=0"]

def dinrec(argv, fault=None):
    env = {**os.environ, **({"DINREC_FAULT": fault} if fault else {})}
    p = subprocess.run([sys.executable, "-m", "launch.cli", *argv], env=env, capture_output=True, text=True, timeout=200)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    return p.returncode, (json.loads(lines[-1]) if lines else p.stderr[-800:])

out = {}
rc, ref = dinrec(["train", *base, "train.out_dir=/tmp/ck/ref"])
out["reference"] = ref
rc_kill, _ = dinrec(["train", *base, "train.out_dir=/tmp/ck/killed"], fault="kill:0:12")
rc, res = dinrec(["train", *base, "train.out_dir=/tmp/ck/killed", "--resume"])
out["killed_rc"], out["resumed"] = rc_kill, res
if isinstance(ref, dict) and isinstance(res, dict):
    a, b = checkpoint.read_tensors(ref["checkpoint"]), checkpoint.read_tensors(res["checkpoint"])
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    out["resume_tensors"] = len(a)
    out["resume_differing"] = diff
# the same checkpoint evaluated under another plan: every table row-wise (reference: FBGEMM's choice)
rc, ev = dinrec(["eval", "--checkpoint", "/tmp/ck/ref", "--no-progress", *base[3:],
                 "tables.0.sharding_types=[row_wise]", "tables.1.sharding_types=[row_wise]", "tables.2.sharding_types=[row_wise]"])
out["eval_row_wise"] = ev
# a 1e8-row item table (dim 16, fp32: 6.4 GB plus its Adagrad state and MBA counts)
big = [*base, "tables.0.num_rows=100000000", "tables.0.dim=16", "tables.1.dim=16", "train.epochs=1", "train.limit_batches=10"]
rc, r = dinrec(["train", *big, "train.out_dir=/tmp/ck/big"])
out["big_train"] = r
if isinstance(r, dict):
    m = json.load(open(os.path.join(r["checkpoint"], "manifest.json")))
    out["big_checkpoint"] = {"write_seconds": m["write_seconds"], "bytes": m["bytes"]}
    rc, r2 = dinrec(["train", *big, "train.out_dir=/tmp/ck/big", "train.epochs=2", "--resume"])
    log = [json.loads(x) for x in open("/tmp/ck/big/metrics.jsonl")]
    out["big_resume"] = {"rc": rc, "load_seconds": [x["load_seconds"] for x in log if "load_seconds" in x]}
print(json.dumps(out))
PY
  tail -c 3000 "$OUT/checkpoint_gpu.json"; tail -3 "$OUT/checkpoint_gpu.err"
}

mba() {
  timeout 240 python3 -m pytest -q -p no:cacheprovider -k cuda \
    tests/embedding/test_mba.py tests/embedding/test_mba_tbe.py tests/embedding/test_mba_torchrec.py > "$OUT/pytest_gpu.txt" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest_gpu.txt"
  tail -5 "$OUT/pytest_gpu.txt"
  timeout 150 python3 -m tools.bench_embedding embedding --device cuda --kernels auto --steps 50 --warmup 5 --profile \
    > "$OUT/bench_embedding.json" 2> "$OUT/bench_embedding.err"
  cat "$OUT/bench_embedding.json"; tail -3 "$OUT/bench_embedding.err"
  timeout 100 python3 -m launch.cli train --config configs/tiny.yaml --no-progress data.train=$TINY/train \
    data.test=$TINY/test launch.use_gpu=true train.out_dir=/tmp/runs/gpu_mba sparse_optimizer.type=sgd_mba \
    sparse_optimizer.lambda=0.01 > "$OUT/din_mba_gpu.json" 2> "$OUT/din_mba_gpu.err"
  tail -1 "$OUT/din_mba_gpu.json"; tail -3 "$OUT/din_mba_gpu.err"
}

e2e() {  # DIN at batch 4096 on one GPU, fed from Parquet (0, 4, 8 loader workers) vs in memory; then sgd_mba
  synthetic
  local data="data.train=/tmp/synthetic/train/*.parquet"
  for w in 0 4 8; do
    timeout 150 python3 -m launch.cli bench e2e --config configs/din_synthetic.yaml --device cuda --steps 80 --warmup 10 \
      data.batch_size=4096 data.loader_workers=$w model.compile=false "$data" > "$OUT/e2e_w$w.json" 2> "$OUT/e2e_w$w.err"
    tail -1 "$OUT/e2e_w$w.json"; tail -2 "$OUT/e2e_w$w.err"
  done
  timeout 150 python3 -m launch.cli bench e2e --config configs/din_synthetic.yaml --device cuda --steps 80 --warmup 10 \
    data.batch_size=4096 data.loader_workers=8 model.compile=false sparse_optimizer.type=sgd_mba sparse_optimizer.lambda=0.01 "$data" \
    > "$OUT/e2e_mba_w8.json" 2> "$OUT/e2e_mba_w8.err"
  tail -1 "$OUT/e2e_mba_w8.json"; tail -2 "$OUT/e2e_mba_w8.err"
}

for section in "${@:-mba dien e2e checkpoint}"; do
  for s in $section; do echo "== $s"; "$s"; done
done
