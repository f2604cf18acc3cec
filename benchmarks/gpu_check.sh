#!/usr/bin/env bash
# The GPU paths, timed side by side in one short device run (see benchmarks/README.md). First what the
# token cache must win: extract stage with AMP vs min(bare forward, decode) for ViT-S/8 and ViT-B/8 @224
# (goal >= 0.8), and the train-head step cached vs live ViT-S/8 / ViT-B/8 at batch 8 (goals >= 5x / 10x);
# then (gpu_extras.py) AMP parity of the tokens, PCA moments on the GPU (torch; cupy/cuML's backend when
# installed) vs numpy, exact kNN on CUDA vs the CPU path, and the cached head step at 224 eager vs
# torch.compile (default and reduce-overhead = CUDA graphs); last the CPU kNN rows (vs faiss, sgemm bound) on
# the device's cores. The device image has torch and timm but not zarr/omegaconf/numba/faiss: they travel as
# wheels in .whl/ (python 3.12), see benchmarks/README.md. Budget: about 6 minutes; each step is capped.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
timeout 240 python3 benchmarks/run_all.py --only extract --only train_step --out "$OUT/cache" 2>&1 | grep -v "^\s*$" | tail -20
python3 - "$OUT/cache/bench.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    if r["ratio"] is not None:
        print(f"RATIO {r['ratio']:8.3f}  goal {r['goal'] or '-':>12}  {r['verdict']:>5}  {r['metric']}")
EOF
timeout 150 python3 benchmarks/gpu_extras.py | tee "$OUT/gpu_extras.txt"
timeout 120 python3 benchmarks/run_all.py --quick --only knn --out "$OUT/knn" 2>&1 | grep -v "^\s*$" | tail -8
