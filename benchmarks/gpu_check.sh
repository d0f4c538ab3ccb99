#!/usr/bin/env bash
# The device check for a lent GPU (at most 11.5 minutes of commands, each with its own limit, so
# that the machine's start fits in a session's 15 minutes of device time): one prepared script,
# run from the repository root on the device machine, its JSON lines under $OUT (or ./work/gpu).
#
#   bash benchmarks/gpu_check.sh            # needs .venv (make setup) carried to the machine
#
# 1. Where the paper step's time goes on the GPU: the kernels' table at batch 64 in bf16 (the
#    paper preset's training precision on CUDA), again with the network channels-last
#    (train.channels_last), and at batch 8 (launch-bound), torch.profiler.
# 2. Two Ray Train workers sharing the one GPU (0.5 GPU each): DDP through NCCL, then gloo if
#    NCCL refuses two ranks on one device; the all-reduce and identical weights checked.
# 3. A few minutes of both presets' learning and their triplets/s (benchmarks/gpu_presets.py).
# Each step has its own time limit so one stuck step leaves time for the rest.
set -u
OUT="${OUT:-work/gpu}"
mkdir -p "$OUT"
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout 120 $PY benchmarks/profile_step.py --json --device cuda --bf16 --batch 64 --steps 3 --rows 25 \
    > "$OUT/profile_b64_bf16.txt" 2>&1
timeout 120 $PY benchmarks/profile_step.py --json --device cuda --bf16 --batch 64 --steps 3 --rows 25 --channels-last \
    > "$OUT/profile_b64_bf16_channels_last.txt" 2>&1
timeout 60 $PY benchmarks/profile_step.py --json --device cuda --bf16 --batch 8 --steps 5 --rows 25 \
    > "$OUT/profile_b8_bf16.txt" 2>&1
timeout 120 $PY benchmarks/two_workers.py --json --preset tiny --steps 20 --batch 16 --backend nccl \
    > "$OUT/two_workers_nccl.txt" 2>&1 || \
timeout 90 $PY benchmarks/two_workers.py --json --preset tiny --steps 20 --batch 16 --backend gloo \
    > "$OUT/two_workers_gloo.txt" 2>&1
timeout 180 $PY benchmarks/gpu_presets.py --json --presets tiny,paper --seconds 30,60 \
    > "$OUT/gpu_presets.txt" 2>&1
tail -n 1 "$OUT"/*.txt
