#!/usr/bin/env bash
# The GPU run of the few-bit Triton backend, as one script (issue 21):
#   1. bit-for-bit checks of the Triton path on the device (the CUDA test, then fewbit_cuda_check, which
#      also prints which forwards run fused)
#   2. the operator benchmark on CUDA: fp32 and bf16 at 1M, 12.6M and 100M elements, b = 1 2 3 4 8,
#      with achieved memory bandwidth against the device's (fewbit_ops_cuda)
#   3. the whole-model benchmark: gpt2-medium and the Llama-style llama-1b, bf16 autocast, 2-bit
#      (fewbit_models_cuda)
# Results go to benchmarks/results/latest/ (or $TIGHTFIT_BENCH_RESULTS); each file records the device.
#
#   bash benchmarks/fewbit/device_run.sh            # on a machine with a CUDA GPU and Triton
#   DRY_RUN=1 bash benchmarks/fewbit/device_run.sh  # CPU: the same three steps at small sizes, through
#                                                   # Triton's interpreter (results named *_dryrun)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

if [ "${DRY_RUN:-0}" = "1" ]; then
    TRITON_INTERPRET=1 TIGHTFIT_FEWBIT_BACKEND=triton "$PY" -m benchmarks.fewbit.cuda_check --device cpu \
        --lengths 1 7 4099 --results fewbit_cuda_check_dryrun
    TRITON_INTERPRET=1 TIGHTFIT_FEWBIT_BACKEND=triton "$PY" -m benchmarks.fewbit.ops --device cpu \
        --dtype fp32 bf16 --n 1000 70000 --bits 2 4 --repeats 2 --threads 1 --no-kernels \
        --results fewbit_ops_cuda_dryrun
    "$PY" -m benchmarks.fewbit.models --device cpu --zoo gpt2-medium-tiny:2:64 llama-1b-tiny:2:64 \
        --amp bf16 --rounds 2 --results fewbit_models_cuda_dryrun
    exit 0
fi

"$PY" -c "import torch, triton; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(), triton.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
status=0
"$PY" -m pytest -q -p no:cacheprovider tests/fewbit/test_triton.py -k cuda || status=$?
"$PY" -m benchmarks.fewbit.cuda_check || status=$?   # a failed check is reported, the timings still run
"$PY" -m benchmarks.fewbit.ops --device cuda --dtype fp32 bf16 --n 1000000 12600000 100000000 \
    --bits 1 2 3 4 8 --repeats 11 --no-kernels
"$PY" -m benchmarks.fewbit.models --device cuda --bits 2 --rounds 5
exit $status
