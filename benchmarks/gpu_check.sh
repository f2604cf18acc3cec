#!/usr/bin/env bash
# The GPU paths, timed side by side in one short device run (see benchmarks/README.md):
# extract stage with AMP vs bare forward (ViT-S/8, ViT-B/8 @224), train-head step cached vs live, kNN,
# PCA moments on the GPU vs numpy, AMP parity of the tokens. The device image has torch and timm but not
# zarr/omegaconf: they travel as wheels in .whl/ (python 3.12), see benchmarks/README.md.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
python3 benchmarks/gpu_extras.py | tee "$OUT/gpu_extras.txt"
python3 benchmarks/run_all.py --only extract --only train_step --only knn --out "$OUT" 2>&1 | grep -v "^\s*$" | tail -30
