#!/usr/bin/env bash
# The GPU run of issue 12, one self-contained script for a machine with one NVIDIA GPU and jax
# (CUDA), torch and triton already installed (it installs nothing); under 6 minutes on an H200.
# It runs the Pallas GPU tests on the hardware, then benchmarks/gpu_sweep.py, writing into OUT:
# tests.txt, gpu_sweep.{json,md}, h200.json (-> benchmarks/results/h200.json) and
# gpu_tuning.json (-> jaxquant/kernels/gpu_tuning.json).
#
#   benchmarks/gpu_sweep.sh OUT            # on the GPU machine, from the checkout
#   benchmarks/gpu_sweep.sh OUT --dry-run  # on a CPU: no tests, Pallas interpreted, tiny sizes
set -uo pipefail
out="${1:?usage: benchmarks/gpu_sweep.sh OUT [--dry-run]}"
mode="${2:-}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.txt"
if [ "$mode" != "--dry-run" ]; then
  # JAX 0.11 deprecates the Pallas Triton backend: its DeprecationWarning is reported (-rw),
  # not turned into a failure by the project's filterwarnings = error.
  timeout 110 python -m pytest -q -p no:cacheprovider -W default::DeprecationWarning -rfEw \
    --tb=short tests/test_pallas_gpu.py tests/test_gpu_tuning.py tests/test_qmatmul.py \
    -k "pallas or gpu or tuning" > "$out/tests.txt" 2>&1
  [ "$?" -eq 0 ] || status=1
  tail -40 "$out/tests.txt"
fi
timeout 245 python benchmarks/gpu_sweep.py --out "$out" --budget-s 190 $mode 2>&1 | tee "$out/sweep.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
