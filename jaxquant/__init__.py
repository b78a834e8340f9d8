"""jaxquant: weight quantisation (quantization) for JAX, built on optimal formats."""
