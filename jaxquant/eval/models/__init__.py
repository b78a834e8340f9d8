"""Pretrained models written with `nnx.Linear` / `nnx.Embed`, so `jaxquant.nnx` can quantise them."""
