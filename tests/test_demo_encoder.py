"""The demo word tokenizer (ids / masks of known sentences) and the tiny text encoder: shapes,
zeroed padding, independence from padding, distinct captions, gradients to used words."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from magi_jax.proj.bouncing.text_encoder import DemoTextEncoder, WordTokenizer

VOCAB = ["red", "green", "blue", "ball", "square", "moves", "left", "right"]
#         2      3        4       5       6         7        8       9


TOK = WordTokenizer(VOCAB, max_length=8)


@pytest.fixture(scope="module")
def enc():
  """One 2-layer encoder for the module (eager init and op-by-op calls are slow on CPU)."""
  return DemoTextEncoder(TOK.vocab_size, TOK.max_length, width=16, out_channels=12,
                         num_layers=2, num_heads=2, rngs=nnx.Rngs(0))


@nnx.jit
def apply(model, ids, mask):
  return model(ids, mask)


def test_tokenizer_known_sentences():
  tok = WordTokenizer(VOCAB, max_length=6)
  assert tok.vocab_size == 10
  ids, mask = tok(["Red ball moves left.", "blue;square,moves  RIGHT", ""])
  chex.assert_shape([ids, mask], (3, 6))
  chex.assert_type(ids, np.int32)
  chex.assert_type(mask, np.float32)
  np.testing.assert_array_equal(ids, [[2, 5, 7, 8, 0, 0],
                                      [4, 6, 7, 9, 0, 0],
                                      [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0],
                                       [1, 1, 1, 1, 0, 0],
                                       [0, 0, 0, 0, 0, 0]])


def test_tokenizer_unknown_words_and_truncation():
  tok = WordTokenizer(VOCAB, max_length=3)
  ids, mask = tok(["a purple ball", "green ball moves left right"])
  np.testing.assert_array_equal(ids, [[1, 1, 5], [3, 5, 7]])
  np.testing.assert_array_equal(mask, np.ones((2, 3)))


def test_tokenizer_validation_and_round_trip():
  with pytest.raises(ValueError):
    WordTokenizer(VOCAB, max_length=0)
  with pytest.raises(ValueError):
    WordTokenizer(["red", "blue", "red"], max_length=4)
  with pytest.raises(ValueError):
    WordTokenizer(["Red"], max_length=4)  # text is lower-cased: it could never match
  tok = WordTokenizer(VOCAB, max_length=5)
  again = WordTokenizer.from_dict(tok.to_dict())
  assert again.vocabulary == VOCAB and again.max_length == 5
  texts = ["green square moves right", "what"]
  for a, b in zip(tok(texts), again(texts)):
    np.testing.assert_array_equal(a, b)


def test_encoder_shapes_dtypes_and_zero_padding(enc):
  ids, mask = TOK(["red ball", "blue square moves left", ""])
  emb, out_mask = apply(enc, ids, mask)
  chex.assert_shape(emb, (3, 8, 12))
  chex.assert_type([emb, out_mask], jnp.float32)
  chex.assert_tree_all_finite(emb)
  np.testing.assert_array_equal(out_mask, mask)
  emb = np.asarray(emb)
  assert not emb[mask == 0].any()
  assert (np.abs(emb[mask == 1]).sum(axis=-1) > 0).all()


def test_encoder_output_independent_of_padding(enc):
  ids, mask = TOK(["green ball moves right", "red square"])
  emb, _ = apply(enc, ids, mask)
  # Arbitrary ids under the padding: identical output.
  junk = np.where(mask == 0, np.arange(ids.size).reshape(ids.shape) % TOK.vocab_size, ids)
  assert (junk != ids).any()
  emb_junk, _ = apply(enc, junk.astype(np.int32), mask)
  np.testing.assert_array_equal(np.asarray(emb_junk), np.asarray(emb))
  # Less padding (shorter arrays) gives the same valid rows: padded keys are not attended.
  emb_short, _ = apply(enc, ids[:, :4], mask[:, :4])
  np.testing.assert_allclose(np.asarray(emb_short), np.asarray(emb)[:, :4], atol=1e-6)


def test_different_captions_give_different_embeddings(enc):
  texts = ["red ball moves left", "blue ball moves left", "red ball moves right"]
  emb, _ = apply(enc, *TOK(texts))
  emb = np.asarray(emb)
  # The colour word changes every row through attention, not just its own.
  for pos in range(4):
    assert not np.allclose(emb[0, pos], emb[1, pos], atol=1e-4)
  assert not np.allclose(emb[0], emb[2], atol=1e-4)


def test_gradients_reach_the_used_word_embeddings(enc):
  ids, mask = TOK(["red ball moves", "square"])
  target = jax.random.normal(jax.random.key(1), (2, 8, 12))

  def loss(model):
    emb, m = model(ids, mask)
    return jnp.sum(((emb - target) * m[..., None]) ** 2)

  grads = nnx.jit(nnx.grad(loss))(enc)
  g = np.asarray(grads.token_embed.embedding[...])
  chex.assert_shape(g, (TOK.vocab_size, 16))
  row_norm = np.abs(g).sum(axis=-1)
  used = [2, 5, 7, 6]  # red, ball, moves, square
  assert (row_norm[used] > 0).all()
  unused = [i for i in range(TOK.vocab_size) if i not in used]
  np.testing.assert_array_equal(row_norm[unused], 0.0)  # includes pad (0) and unknown (1)
  assert np.abs(np.asarray(grads.pos_embed[...])).sum() > 0
  assert np.abs(np.asarray(grads.out.kernel[...])).sum() > 0
