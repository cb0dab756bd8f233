#!/usr/bin/env bash
# The GPU checks in one run (a GPU machine with torch, triton, transformers, hypothesis, pytest,
# pytest-xdist): the CUDA tests (Triton kernels fp32/fp16/bf16, the backend on a transformers Mixtral,
# offloading with side-stream copies), one MoE layer in bf16 against transformers' torch._grouped_mm
# path, Inductor and the dense bound, and the offload bench on CUDA.
# Usage: bash bench/gpu_checks.sh [LOG_DIR [STEP...]]   steps: tests moe_layer moe_layer_fine offload
# (default: all, in that order; each has its own time limit; logs go to LOG_DIR)
set -u
LOG=${1:-gpu_logs}
shift || true
STEPS=${*:-tests moe_layer moe_layer_fine offload}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2; shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    local t0=$SECONDS
    echo "=== $name (limit ${secs}s)"
    timeout -s ABRT "$secs" "$@" > "$LOG/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOG/$name.log"
    echo "=== $name rc=$rc in $((SECONDS - t0))s"
}
nvidia-smi -L
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$LOG/install.log" 2>&1 || { cat "$LOG/install.log"; exit 1; }
step tests 200 python3 -m pytest -q -rfE -p no:cacheprovider -n 8 --timeout 150 tests/test_gpu.py
step moe_layer 120 python3 bench/moe_layer.py --device cuda --dtype bfloat16 --layers mixtral_8x7b --tokens 16,4096 \
    --no-train --repeats 10
step moe_layer_fine 90 python3 bench/moe_layer.py --device cuda --dtype bfloat16 --layers qwen_moe_a2_7b --tokens 512 \
    --no-train --repeats 10
# decode lengths recompile (dynamic=False): 8 decode steps keep the compile-and-warm-up repetition near a minute
step offload 150 python3 -X faulthandler bench/offload.py --quick --device cuda --decode 8 --reps 3 \
    --variants on_demand,lru,res+shallow
