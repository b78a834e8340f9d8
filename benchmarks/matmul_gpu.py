"""GPU benchmark of the Pallas qmatmul against a bf16 dense dot, with weights larger than L2.

For M ∈ {1, 16, 64, 256}, K = N ∈ {4096, 8192}, bf16 activations, 4-bit (NF4) and 3-bit
(CRD-t signmax) codes with B = 64: each timed program runs the operation on `--copies`
different weight copies back to back (their total exceeds the 50 MB L2 of an H100/H200, so
every call streams its weight from HBM) and the time per call is the program's median time
over repeats divided by the number of copies. Reports µs per call, the ratio to the bf16
dense dot (speed-up > 1 is faster), effective weight bandwidth in GB/s, and the
dequantise-then-dot path. Writes `gpu_matmul.md` and `gpu_matmul.json` into `--out`.

    python benchmarks/matmul_gpu.py --out DIR            # on the GPU machine
    python benchmarks/matmul_gpu.py --out DIR --dry-run  # tiny sizes, Pallas interpreted (CPU)
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

import jaxquant as jq
from timing import median_seconds

FORMATS = {4: "nf4", 3: "crd-t5-signmax-3b-B64"}


def per_call_seconds(op, x, weights, repeats):
  program = jax.jit(lambda a, ws: [op(a, w) for w in ws])
  return median_seconds(program, x, weights, repeats=repeats) / len(weights)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, type=pathlib.Path)
  parser.add_argument("--dry-run", action="store_true")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  sizes, ms, copies, repeats = (([256], [1, 16], 2, 1) if args.dry_run else
                                ([4096, 8192], [1, 16, 64, 256], 8, args.repeats))
  dense = lambda a, w: jnp.dot(a, w, preferred_element_type=jnp.float32).astype(a.dtype)
  pallas = lambda a, q: jq.qmatmul(a, q, backend="pallas")
  dequantise_then_dot = lambda a, q: dense(a, jq.dequantise(q, jnp.bfloat16))
  device = str(jax.devices()[0])
  rows = []
  for size in sizes:
    keys = jax.random.split(jax.random.key(0), copies)
    floats = [jax.random.normal(k, (size, size), jnp.float32) * 0.02 for k in keys]
    dense_weights = [w.astype(jnp.bfloat16) for w in floats]
    for bits, name in FORMATS.items():
      quantised = [jq.quantise(w, jq.QuantSpec(name, axis=0)) for w in floats]
      stored = quantised[0].storage_bits / 8
      for m in ms:
        x = jax.random.normal(jax.random.key(1), (m, size), jnp.bfloat16)
        t_dense = per_call_seconds(dense, x, dense_weights, repeats)
        t_pallas = per_call_seconds(pallas, x, quantised, repeats)
        t_deq = per_call_seconds(dequantise_then_dot, x, quantised, repeats)
        rows.append(dict(
            K=size, N=size, M=m, bits=bits, format=name, bits_per_param=quantised[0].bits_per_param,
            dense_bf16_us=t_dense * 1e6, pallas_us=t_pallas * 1e6, dequant_dot_us=t_deq * 1e6,
            speedup_vs_bf16=t_dense / t_pallas, speedup_vs_dequant_dot=t_deq / t_pallas,
            pallas_weight_gb_s=stored / t_pallas / 1e9,
            dense_weight_gb_s=size * size * 2 / t_dense / 1e9))
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in rows[-1].items()), flush=True)
  header = ("| K=N | M | bits | bf16 dot µs | Pallas µs | speed-up vs bf16 | Pallas weight GB/s "
            "| dequant+dot µs |\n|---|---|---|---|---|---|---|---|\n")
  table = header + "".join(
      f"| {r['K']} | {r['M']} | {r['bits']} ({r['bits_per_param']:.2f} b) | "
      f"{r['dense_bf16_us']:.1f} | {r['pallas_us']:.1f} | {r['speedup_vs_bf16']:.2f}× | "
      f"{r['pallas_weight_gb_s']:.0f} | {r['dequant_dot_us']:.1f} |\n" for r in rows)
  args.out.mkdir(parents=True, exist_ok=True)
  note = f"device: {device}; jax {jax.__version__}; {copies} weight copies per timed program\n\n"
  (args.out / "gpu_matmul.md").write_text(note + table)
  (args.out / "gpu_matmul.json").write_text(json.dumps(dict(device=device, rows=rows), indent=1))
  print(note + table)
  return rows


if __name__ == "__main__":
  main()
