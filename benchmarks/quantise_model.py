"""Quantising a 1B-parameter model from host memory, and how many programs 11 formats compile.

Part 1. A Llama-shaped NNX decoder written with raw `nnx.Param`s (TinyLlama-1.1B's shapes by
default: d = 2048, 22 layers, FFN 5632, 32 query and 4 key/value heads, vocabulary 32000;
1.03 B parameters) is built abstractly with `nnx.eval_shape`, its float32 weights are drawn
into host (numpy) memory, and `jq.nnx.quantise_model(abstract, rules, params=host,
inputs=...)` finds every weight by tracing the abstract model and quantises them to NF4
(B = 64) one at a time. Printed: the wall time of that call, and the peak of the device arrays
alive during it (`jax.live_arrays()`, polled every 5 ms; XLA's own temporaries are added from
the compiled quantise program of the largest weight), against the float model's bytes.

Part 2. One jitted forward of a small model, quantised with 11 formats of 4 bits: how many
programs it compiled (formats are array leaves, not static metadata, so the answer is one).

    python benchmarks/quantise_model.py [--layers 22] [--width 2048] [--ffn 5632]
"""

from __future__ import annotations

import argparse
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxquant as jq


class Block(nnx.Module):
  """Pre-norm attention (grouped key/value heads, no RoPE) and a gated MLP, raw Params."""

  def __init__(self, d, ffn, heads, kv_heads, rngs):
    init = nnx.initializers.lecun_normal()
    param = lambda *shape: nnx.Param(init(rngs.params(), shape))
    self.heads, self.kv_heads = heads, kv_heads
    self.q, self.o = param(d, d), param(d, d)
    self.k, self.v = param(d, d // heads * kv_heads), param(d, d // heads * kv_heads)
    self.gate, self.up, self.down = param(d, ffn), param(d, ffn), param(ffn, d)
    self.norm1, self.norm2 = nnx.Param(jnp.ones((d,))), nnx.Param(jnp.ones((d,)))

  def __call__(self, x):
    b, t, d = x.shape
    h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * self.norm1[...][None, None]
    q = (h @ self.q[...]).reshape(b, t, self.heads, -1)
    k = jnp.repeat((h @ self.k[...]).reshape(b, t, self.kv_heads, -1),
                   self.heads // self.kv_heads, axis=2)
    v = jnp.repeat((h @ self.v[...]).reshape(b, t, self.kv_heads, -1),
                   self.heads // self.kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    attention = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v).reshape(b, t, d)
    x = x + attention @ self.o[...]
    h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * self.norm2[...][None, None]
    return x + (jax.nn.silu(h @ self.gate[...]) * (h @ self.up[...])) @ self.down[...]


class Decoder(nnx.Module):

  def __init__(self, vocab, d, ffn, layers, heads, kv_heads, rngs):
    self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab, d)))
    self.blocks = nnx.List([Block(d, ffn, heads, kv_heads, rngs) for _ in range(layers)])

  def __call__(self, ids):
    x = self.embed[...][ids]
    for block in self.blocks:
      x = block(x)
    return x @ self.embed[...].T  # the tied head


def host_params(abstract, seed=0):
  """Float32 numpy arrays shaped like the abstract model's state (N(0, 1/fan_in))."""
  rng = np.random.default_rng(seed)
  state = nnx.to_pure_dict(nnx.state(abstract))
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) /
                                 np.float32(np.sqrt(s.shape[0]))), state)


def peak_live_bytes(fn):
  """(fn(), the peak bytes of live device arrays while it ran, polled every 5 ms)."""
  peak, done = [0], threading.Event()

  def poll():
    while not done.is_set():
      peak[0] = max(peak[0], sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted()))
      time.sleep(0.005)

  thread = threading.Thread(target=poll)
  thread.start()
  try:
    result = fn()
  finally:
    done.set()
    thread.join()
  return result, peak[0]


def quantise_from_host(args):
  rules = [jq.Rule(".*", jq.QuantSpec("nf4", block_size=64))]
  build = lambda: Decoder(args.vocab, args.width, args.ffn, args.layers, args.heads,
                          args.kv_heads, nnx.Rngs(0))
  abstract = nnx.eval_shape(build)
  start = time.perf_counter()
  params = host_params(abstract)
  drawn = time.perf_counter() - start
  n = sum(leaf.size for leaf in jax.tree.leaves(params))
  ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  start = time.perf_counter()
  model, peak = peak_live_bytes(lambda: jax.block_until_ready(
      jq.nnx.quantise_model(abstract, rules, params=params, inputs=(ids,))))
  seconds = time.perf_counter() - start
  packed = jq.nnx.quantised_bytes(model)
  largest = max((leaf for leaf in jax.tree.leaves(params)), key=lambda a: a.size)
  spec = jq.QuantSpec("nf4", block_size=64, axis=0)
  temp = jax.jit(lambda w: jq.quantise(w, spec, check_finite=False)).lower(
      jax.ShapeDtypeStruct(largest.shape, jnp.float32)).compile().memory_analysis()
  float_bytes = 4 * n
  print(f"{n / 1e9:.3f} B parameters ({args.layers} layers, d={args.width}, FFN {args.ffn}); "
        f"float32 {float_bytes / 2**30:.2f} GiB drawn on the host in {drawn:.1f} s")
  print(f"quantise_model(abstract, params=host, inputs=...): {seconds:.1f} s")
  print(f"packed weights {packed / 2**30:.3f} GiB ({packed / float_bytes:.4f} of float32)")
  print(f"peak live device arrays {peak / 2**30:.3f} GiB; + XLA temporaries of the largest "
        f"weight's quantise {temp.temp_size_in_bytes / 2**20:.1f} MiB; "
        f"= {(peak + temp.temp_size_in_bytes) / float_bytes:.3f} of the float model")
  return dict(parameters=n, seconds=seconds, packed_bytes=packed, peak_bytes=peak,
              temp_bytes=temp.temp_size_in_bytes, float_bytes=float_bytes)


FORMATS = ("int4", "int4-sym", "nf4", "sf4", "e2m1", "crd-normal-absmax-4b",
           "crd-laplace-absmax-4b", "crd-t5-absmax-4b", "crd-normal-signmax-4b",
           "crd-t5-signmax-4b", "grid15")


def compilations_for_formats():
  small = Decoder(512, 256, 512, 2, 4, 2, nnx.Rngs(0))
  ids = jnp.zeros((1, 8), jnp.int32)
  forward = jax.jit(lambda model, ids: model(ids))
  for name in FORMATS:
    model = jq.nnx.quantise_model(small, [jq.Rule(".*", jq.QuantSpec(name, block_size=64))],
                                  inputs=(ids,))
    jax.block_until_ready(forward(model, ids))
  count = forward._cache_size()  # pylint: disable=protected-access
  print(f"{len(FORMATS)} formats of 4 bits ({', '.join(FORMATS)}): {count} compiled forward")
  return count


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=22)
  parser.add_argument("--width", type=int, default=2048)
  parser.add_argument("--ffn", type=int, default=5632)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=32000)
  args = parser.parse_args(argv)
  print(f"{jax.default_backend()}, jax {jax.__version__}")
  return quantise_from_host(args), compilations_for_formats()


if __name__ == "__main__":
  main()
