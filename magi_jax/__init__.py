"""magi_jax: MAGI-1, the autoregressive video world model, in JAX/Flax NNX."""

__version__ = "0.1.0"
