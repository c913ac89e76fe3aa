#!/usr/bin/env bash
# One short run on a lent GPU machine (CUDA image: python3 with torch, no network): the CUDA
# code-path tests, then the harness on CUDA. Wheels for what the image lacks travel in .whl/
# (see docs/BENCHMARKS.md, "GPU"). Writes logs and results.tar under $OUT (or ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 SEGCORE_BENCH_DIR=/tmp/segcore-bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.log"
nproc | tee -a "$OUT/gpu.log"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.log"
# a tiny segcore CLI shim: the image has no console script for segcore
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -m segcore "$@"\n' > /tmp/bin/segcore && chmod +x /tmp/bin/segcore
export PATH=/tmp/bin:$PATH

timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/tests.log"

R=/tmp/gpu-results
run() { echo "+ $*" | tee -a "$OUT/bench.log"; timeout 110 "$@" 2>&1 | tee -a "$OUT/bench.log"; }
run python3 -m bench compare --device cuda --model unet-w16 --size 4096 --tile 1024 --amp auto \
  --repeats 2 --contenders bare,segment,monai-0.25 --results $R --tag h200-unet-w16-4096
run python3 -m bench compare --device cuda --model unet-w64 --size 8192 --tile 2048 --amp auto \
  --repeats 2 --contenders bare,segment,monai-0.25 --results $R --tag h200-unet-w64-8192
run python3 -m bench io --device cuda --size 4096 --tile 1024 --kinds tiff,zarr --repeats 2 --workers 0,default \
  --results $R --tag h200-io-4096
tar -cf "$OUT/results.tar" -C $R .
