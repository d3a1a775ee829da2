"""magi_jax: MAGI-1 (chunk-causal autoregressive video diffusion) in JAX/Flax NNX.

The metadata, dependencies and extras live in pyproject.toml (PEP 621); this file lets older
tooling that calls `setup.py` directly build the same package.
"""

from setuptools import setup

setup()
