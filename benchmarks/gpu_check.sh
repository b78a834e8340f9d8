#!/usr/bin/env bash
# The GPU check: one self-contained run on a machine with one NVIDIA GPU and jax[cuda] already
# installed (it installs nothing). Runs the Pallas tests on the real GPU backend, then the GPU
# benchmark, and writes everything into OUT (under 8 minutes on an H200).
#
#   benchmarks/gpu_check.sh OUT            # on the GPU machine, from the checkout
#   benchmarks/gpu_check.sh OUT --dry-run  # on a CPU: Pallas interpreted, tiny sizes
set -uo pipefail
out="${1:?usage: benchmarks/gpu_check.sh OUT [--dry-run]}"
mode="${2:-}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
python -c "import jax; print(jax.__version__, jax.devices())" 2>&1 | tee "$out/devices.txt"
if [ "$mode" = "--dry-run" ]; then
  tests=(tests/test_qmatmul.py -k pallas)
else
  tests=(tests/test_pallas_gpu.py tests/test_qmatmul.py -k "pallas or gpu")
fi
# JAX 0.11 deprecates the Pallas Triton backend: on the GPU its DeprecationWarning is reported
# (-rw), not turned into a failure by the project's filterwarnings = error.
timeout 300 python -m pytest -q -p no:cacheprovider -W default::DeprecationWarning -rfEw \
  --tb=short "${tests[@]}" > "$out/tests.txt" 2>&1
[ "$?" -eq 0 ] || status=1
tail -60 "$out/tests.txt"
timeout 300 python benchmarks/matmul_gpu.py --out "$out" $mode 2>&1 | tee "$out/benchmark.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
