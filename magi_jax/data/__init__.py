"""Training data, any source: first-fit-decreasing chunk packing, the video-folder tfds builder
(array_record, TensorFlow-free) and the checkpointable grain pipeline.

The tfds builder and the grain pipeline are imported from their modules
(`magi_jax.data.tfds_video_folder`, `magi_jax.data.pipeline`) so that packing needs neither
tensorflow_datasets nor grain. The bouncing-shapes demo world is `magi_jax.proj.bouncing`.
"""

from magi_jax.data.errors import DataError
from magi_jax.data.packing import first_fit_decreasing, pack

__all__ = ["DataError", "first_fit_decreasing", "pack"]
