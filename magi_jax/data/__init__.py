"""Training data: the bouncing-shapes world, tfds builders (array_record, TensorFlow-free),
first-fit-decreasing chunk packing and the checkpointable grain pipeline.

The tfds builders and the grain pipeline are imported from their modules
(`magi_jax.data.tfds_bouncing`, `magi_jax.data.tfds_video_folder`, `magi_jax.data.pipeline`) so
that the world simulator and packing need neither tensorflow_datasets nor grain.
"""

from magi_jax.data.bouncing import (Episode, WorldConfig, caption_words, render, rollout,
                                    simulate, vocabulary)
from magi_jax.data.errors import DataError
from magi_jax.data.packing import first_fit_decreasing, pack

__all__ = ["DataError", "Episode", "WorldConfig", "caption_words", "first_fit_decreasing", "pack",
           "render", "rollout", "simulate", "vocabulary"]
