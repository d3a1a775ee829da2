"""The text path: caption cleaning, the T5 tokenizer and encoder, special tokens, DiT text rows."""

from magi_jax.text.cache import EmbeddingCache
from magi_jax.text.encoder import TextEncoder
from magi_jax.text.prompts import (ChunkPrompt, PromptScheduleError, chunk_text_rows,
                                   load_prompt_file, prompts_per_chunk)
from magi_jax.text.rows import NULL_CAPTION_VALID, ArrayTextRows, ChunkTextRows, build_text_rows
from magi_jax.text.special_tokens import SpecialTokenError, SpecialTokens, TextFlags
from magi_jax.text.t5 import T5_V1_1_XXL, T5Config, T5ConfigError, T5Encoder, load_t5_config
from magi_jax.text.tokenizer import T5Tokenizer, TokenizerError

__all__ = ["ArrayTextRows", "ChunkPrompt", "ChunkTextRows", "EmbeddingCache", "NULL_CAPTION_VALID",
           "PromptScheduleError", "SpecialTokenError", "SpecialTokens", "T5Config", "T5ConfigError",
           "T5Encoder", "T5Tokenizer", "T5_V1_1_XXL", "TextEncoder", "TextFlags", "TokenizerError",
           "build_text_rows", "chunk_text_rows", "load_prompt_file", "load_t5_config",
           "prompts_per_chunk"]
