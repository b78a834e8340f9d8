"""Strict test configuration: no silent dtype or rank promotion in library code."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
