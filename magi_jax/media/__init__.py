"""Media I/O and frame arithmetic (official inference/pipeline/video_process.py): input image /
prefix video through the official ffmpeg filter graphs, output mp4 / GIF writing, and the chunk /
frame counts."""

from magi_jax.media.errors import MediaError
from magi_jax.media.frames import (FramePlan, decoded_frames, emitted_latent_range, plan_frames,
                                   prefix_latent_frames_for_video, validate_num_frames,
                                   validate_size)
from magi_jax.media.read import pixels_to_model, read_image, read_video
from magi_jax.media.write import VideoWriter, to_uint8, write_video

__all__ = ["FramePlan", "MediaError", "VideoWriter", "decoded_frames", "emitted_latent_range",
           "pixels_to_model", "plan_frames", "prefix_latent_frames_for_video", "read_image",
           "read_video", "to_uint8", "validate_num_frames", "validate_size", "write_video"]
