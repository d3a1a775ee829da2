"""Checkpoint conversion: official MAGI-1 safetensors <-> magi_jax (orbax)."""

from magi_jax.convert.dit_official import (CheckpointMismatchError, dequantize_fp8,
                                           load_official_dit, official_state_dict,
                                           save_official_dit)
from magi_jax.convert.orbax_io import load_converted, save_converted
from magi_jax.convert.safetensors_io import CheckpointFormatError, save_safetensors

__all__ = ["CheckpointFormatError", "CheckpointMismatchError", "dequantize_fp8",
           "load_converted", "load_official_dit", "official_state_dict", "save_converted",
           "save_official_dit", "save_safetensors"]
