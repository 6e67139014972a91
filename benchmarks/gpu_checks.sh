#!/usr/bin/env bash
# Build, test and benchmark the CUDA kernels on a GPU machine in one go (issues #5, #7).
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh [quick]
#
# Writes build/test/bench logs under $OUT (default ./gpu-out; at most 8 files, the device tool's
# limit).  Uses the machine's python3 and
# torch (no install beyond `pip install --no-deps -e .`).  Each step has its own time limit so a
# hang in one still leaves the others' logs.  `quick` skips the slim-vs-dense and alignment tables;
# `profile` also skips the tests and table b, and runs Nsight Compute on
# benchmarks/profile_kernels.py.  The labs (benchmarks/cuda_lab/*.cu: GEMV configurations,
# quantizer knobs) run in every mode.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GETA_FX_KERNEL_CACHE=/tmp/geta_cache
export MAX_JOBS=${MAX_JOBS:-16}
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m == 9 else ''))")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
step() { local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  echo "== $name: rc=$rc $((SECONDS - t0)) s"; tail -n 4 "$OUT/$name.txt"; }

nvidia-smi -L; python3 -c "import torch; print(torch.__version__, torch.version.cuda)"; nvcc --version | tail -1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.txt 2>&1 || tail /tmp/pip.txt
# the standalone labs build in the background meanwhile (benchmarks/cuda_lab, ~1 min each)
lab_build() {
  local src=benchmarks/cuda_lab/gemv_lab.cu flags="-O3 -std=c++17 -arch=sm_${TORCH_CUDA_ARCH_LIST//./} -split-compile=0 -Igeta_kernels/csrc/cuda"
  nvcc $flags $src -lcublas -o /tmp/gemv_lab && return 0
  local nv; nv=$(python3 -c "import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__))" 2>/dev/null)
  [ -n "$nv" ] && nvcc $flags -I"$nv/include" -L"$nv/lib" -Xlinker -rpath="$nv/lib" $src -lcublas -o /tmp/gemv_lab && return 0
  nvcc $flags -DGEMV_LAB_NO_CUBLAS $src -o /tmp/gemv_lab
}
export -f lab_build
OUT=/tmp step gemv_lab_build 300 bash -c lab_build > /tmp/lab_builds.txt &
OUT=/tmp step quant_lab_build 300 nvcc -O3 -std=c++17 -arch=sm_${TORCH_CUDA_ARCH_LIST//./} \
  -split-compile=0 -Igeta_kernels/csrc/cuda benchmarks/cuda_lab/quant_lab.cu -o /tmp/quant_lab \
  >> /tmp/lab_builds.txt &
# both loaders build in parallel (quantizer kernels: ~25 s; low-bit CUDA: ~100 s)
OUT_FINAL=$OUT; OUT=/tmp
step build_quant 400 python3 -c "import json, geta_fx.kernels as k; print(json.dumps(k.ensure_loaded(), indent=1))" &
step build_lowbit 400 python3 -c "import json, geta_fx.lowbit_kernels as k; print(json.dumps(k.ensure_loaded(), indent=1))" &
wait
OUT=$OUT_FINAL; cat /tmp/build_quant.txt /tmp/build_lowbit.txt > "$OUT/build.txt"
# instruction mix of the fp16 quantize kernels (fast paths: few FRND/F2F/MUFU.RCP per element)
so=$(ls /tmp/geta_cache/cuda-*/geta_fx_kernels_cuda_*.so 2>/dev/null | head -1)
if [ -n "$so" ] && command -v cuobjdump > /dev/null; then
  cuobjdump -sass "$so" | python3 -c "
import re, sys, collections
for f in re.split(r'\n\s*Function : ', sys.stdin.read())[1:]:
    name = f.split('\n')[0]
    if 'Half' not in name: continue
    ops = collections.Counter(o.split('.')[0] for o in re.findall(r'/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)', f))
    print(name[:100], {k: ops[k] for k in ('FRND', 'F2F', 'F2FP', 'MUFU', 'CALL', 'FFMA', 'FADD', 'FMUL')})
" >> "$OUT/build.txt" 2>&1
fi
[ "${1:-}" = profile ] || step tests 300 python3 -m pytest -q -p no:cacheprovider tests/test_deploy.py tests/test_module_device.py tests/ops/test_kernels.py tests/test_lower_act.py -m cuda
wait; cat /tmp/lab_builds.txt
step gemv_lab 240 /tmp/gemv_lab $([ "${1:-}" = quick ] && echo --quick)
step quant_lab 240 /tmp/quant_lab
[ "${1:-}" = profile ] || step bench_deploy_b 200 python3 benchmarks/bench_deploy.py --tables b --devices cuda
step bench_kernels 200 python3 benchmarks/bench_kernels.py --devices cuda --no-compile
if [ -z "${1:-}" ]; then
  step bench_deploy_ac 300 python3 benchmarks/bench_deploy.py --tables ac --devices cuda --min-time 0.1 --rounds 2
fi
if [ "${1:-}" = profile ] && command -v ncu > /dev/null; then
  step ncu 120 ncu --clock-control none -k regex:'gemv_kernel|quantize_forward' \
    --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
    --section MemoryWorkloadAnalysis python3 benchmarks/profile_kernels.py
fi
