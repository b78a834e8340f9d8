"""Evaluation on real pretrained models: loaders, JAX forwards built from NNX layers, metrics."""
