"""The bouncing-shapes demo: a procedural world with known physics, its tfds builder, a
closed-vocabulary text encoder, metrics against the true future, evaluation and samples.

The README's main job (`experiments/configs/bouncing_tiny.py`) trains on it.
"""
