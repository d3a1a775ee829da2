"""Sampling pipeline: components (DiT, VAE, text encoder, special tokens), request, generate."""

from magi_jax.generate.components import (ComponentError, Components, load_dit,
                                          load_special_tokens, load_text_encoder, load_vae)
from magi_jax.generate.pipeline import Result, encode_prefix, generate, text_rows
from magi_jax.generate.request import MODES, Request, RequestError
