"""Evaluation: numpy metrics that score generated videos against a known ground truth.

`bouncing_metrics` compares a continuation of the procedural bouncing-shapes world with its
true future (object centres, brightness, MSE, trivial baselines, colour control).
"""

from magi_jax.evaluation.bouncing_metrics import (DEFAULT_THRESHOLD, blank_frames,
                                                  bright_mask, bright_pixel_count,
                                                  bright_ratio, centre_error, centres,
                                                  constant_velocity_centres,
                                                  constant_velocity_frames,
                                                  continuation_report, copy_last_frame,
                                                  dominant_colour, mse,
                                                  text_control_accuracy)

__all__ = [
    "DEFAULT_THRESHOLD", "blank_frames", "bright_mask", "bright_pixel_count", "bright_ratio",
    "centre_error", "centres", "constant_velocity_centres", "constant_velocity_frames",
    "continuation_report", "copy_last_frame", "dominant_colour", "mse",
    "text_control_accuracy",
]
