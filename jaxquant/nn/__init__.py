"""Flax integration: rules, NNX and Linen layers, checkpoints (imports Flax)."""
