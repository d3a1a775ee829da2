"""The T5 text path: buckets, checkpoint loading, tokenizer, special tokens, rows, cache."""

import json
import os
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from flax import nnx

from magi_jax.formats.safetensors_io import CheckpointFormatError
from magi_jax.official.strict import CheckpointMismatchError
from magi_jax.formats.checkpoint_dir import ShardedCheckpoint
from magi_jax.convert.orbax_io import load_converted_t5, save_converted_t5
from magi_jax.formats.safetensors_io import SafetensorsFile, save_safetensors
from magi_jax.official.t5 import load_t5, load_text_encoder, save_t5, t5_state_dict
from magi_jax.text import (NULL_CAPTION_VALID, PromptScheduleError, SpecialTokenError,
                           SpecialTokens, T5Config, T5Encoder, T5Tokenizer, TextFlags,
                           TokenizerError, build_text_rows, prompts_per_chunk, chunk_text_rows)
from magi_jax.text.t5 import T5ConfigError, relative_position_bucket, t5_config_from_dict

T5_DIR = os.path.join(FIXTURES, "text", "t5_tiny")


def _fixture_io():
  f = SafetensorsFile(os.path.join(FIXTURES, "text", "t5_io.safetensors"))
  return {k: f.get(k) for k in f.keys()}


# ---------------------------------------------------------------- buckets and config

def test_relative_position_buckets_by_hand():
  # 32 buckets, max distance 128: 16 per sign, exact below 8, log-spaced 8..15 beyond.
  rel = np.array([0, -1, -7, -8, -16, -32, -127, -128, -1000, 1, 7, 8, 16, 128, 5000])
  want = [0, 1, 7, 8, 10, 12, 15, 15, 15, 17, 23, 24, 26, 31, 31]
  np.testing.assert_array_equal(relative_position_bucket(rel, 32, 128), want)


def test_hf_config_parsing_and_errors():
  with open(os.path.join(T5_DIR, "config.json")) as f:
    cfg = t5_config_from_dict(json.load(f))
  assert (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.is_gated_act, cfg.dense_act_fn) == (
      64, 4, 16, True, "gelu_new")
  with pytest.raises(T5ConfigError, match="d_ff"):
    t5_config_from_dict({"vocab_size": 5, "d_model": 4, "d_kv": 2, "num_heads": 2, "num_layers": 1})
  with pytest.raises(T5ConfigError, match="feed_forward_proj"):
    t5_config_from_dict({"vocab_size": 5, "d_model": 4, "d_kv": 2, "num_heads": 2, "d_ff": 8,
                         "num_layers": 1, "feed_forward_proj": "weird-gelu"})


# ---------------------------------------------------------------- the encoder

def test_encoder_matches_the_official_output_shapes_and_values():
  d = _fixture_io()
  t5 = load_t5(T5_DIR)
  out = t5(d["t5.input_ids"], d["t5.attention_mask"])
  chex.assert_shape(out, (7, 24, 64))
  chex.assert_type(out, jnp.float32)
  np.testing.assert_allclose(out, d["t5.last_hidden_state"], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_valid_rows():
  # Bidirectional attention with the key mask: valid rows must not see the pad rows.
  t5 = load_t5(T5_DIR)
  ids = np.array([[5, 17, 33, 1, 0, 0, 0, 0]])
  mask = (ids != 0).astype(np.int32)
  mask[0, 3] = 1
  long = t5(ids, mask)[0, :4]
  short = t5(ids[:, :4], mask[:, :4])[0]
  np.testing.assert_allclose(long, short, atol=1e-6)
  junk = ids.copy()
  junk[0, 4:] = 77                        # different pad ids, still masked
  np.testing.assert_allclose(t5(junk, mask)[0, :4], long, atol=1e-6)


def _rand_t5(seed=0, layers=2, gated=True):
  cfg = T5Config(vocab_size=50, d_model=16, d_kv=4, num_heads=4, d_ff=24, num_layers=layers,
                 is_gated_act=gated, dense_act_fn="gelu_new" if gated else "relu")
  return T5Encoder(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_layout_written_by_a_test_loads_strictly(tmp_path, sharded):
  model = _rand_t5()
  save_t5(model, str(tmp_path), max_shard_bytes=4000 if sharded else None)
  assert os.path.exists(tmp_path / ("model.safetensors.index.json" if sharded
                                    else "model.safetensors"))
  back = load_t5(str(tmp_path))
  ids = np.array([[3, 9, 1, 0]])
  mask = np.array([[1, 1, 1, 0]])
  np.testing.assert_array_equal(back(ids, mask), model(ids, mask))


def test_full_encoder_decoder_checkpoint_and_tied_embedding(tmp_path):
  model = _rand_t5()
  sd = t5_state_dict(model)
  sd["encoder.embed_tokens.weight"] = sd.pop("shared.weight")      # only the tied copy
  sd["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((16, 16), np.float32)
  sd["lm_head.weight"] = np.zeros((50, 16), np.float32)
  save_safetensors(sd, str(tmp_path / "model.safetensors"))
  shutil.copy(_config_of(model, tmp_path / "src"), tmp_path / "config.json")
  back = load_t5(str(tmp_path))
  np.testing.assert_array_equal(back.shared[...], model.shared[...])


def _config_of(model, directory):
  save_t5(model, str(directory))
  return os.path.join(directory, "config.json")


def test_strict_loading_names_missing_and_misshaped_tensors(tmp_path):
  model = _rand_t5()
  save_t5(model, str(tmp_path / "ok"))
  sd = t5_state_dict(model)
  del sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
  sd["encoder.final_layer_norm.weight"] = np.ones(17, np.float32)
  sd["encoder.block.9.layer.0.layer_norm.weight"] = np.ones(16, np.float32)
  os.makedirs(tmp_path / "bad")
  save_safetensors(sd, str(tmp_path / "bad" / "model.safetensors"))
  shutil.copy(tmp_path / "ok" / "config.json", tmp_path / "bad" / "config.json")
  with pytest.raises(CheckpointMismatchError) as e:
    load_t5(str(tmp_path / "bad"))
  msg = str(e.value)
  assert "wi_1.weight" in msg and "final_layer_norm.weight" in msg
  del sd["encoder.final_layer_norm.weight"]
  sd["encoder.final_layer_norm.weight"] = np.ones(16, np.float32)
  sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"] = np.ones((24, 16), np.float32)
  save_safetensors(sd, str(tmp_path / "bad" / "model.safetensors"))
  with pytest.raises(CheckpointMismatchError, match="block.9"):
    load_t5(str(tmp_path / "bad"))


def test_bad_bin_and_missing_directories_fail_clearly(tmp_path):
  # .bin directories are read (tests/test_torch_bin.py); broken ones must say what is wrong.
  with pytest.raises(CheckpointFormatError, match="no T5 weights"):
    load_t5(str(tmp_path))
  (tmp_path / "pytorch_model-00001-of-00002.bin").write_bytes(b"x")
  with pytest.raises(CheckpointFormatError, match="no pytorch_model.bin.index.json"):
    load_t5(str(tmp_path))
  (tmp_path / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(CheckpointFormatError, match="pytorch_model.bin: not a zip-based torch.save"):
    load_t5(str(tmp_path))
  with pytest.raises(CheckpointFormatError, match="not found"):
    load_t5(str(tmp_path / "nope"))


def test_orbax_roundtrip_with_tokenizer(tmp_path):
  t5 = load_t5(T5_DIR)
  save_converted_t5(t5, str(tmp_path / "conv"), tokenizer_dir=T5_DIR)
  back = load_converted_t5(str(tmp_path / "conv"))
  d = _fixture_io()
  np.testing.assert_array_equal(back(d["t5.input_ids"], d["t5.attention_mask"]),
                                t5(d["t5.input_ids"], d["t5.attention_mask"]))
  assert os.path.exists(tmp_path / "conv" / "spiece.model")
  ids, _ = T5Tokenizer(str(tmp_path / "conv"))(["a cat"], 8)
  assert ids[0, 0] != 0


def test_convert_command_t5_roundtrip(tmp_path):
  import subprocess
  import sys
  run = lambda *a: subprocess.run([sys.executable, "-m", "magi_jax.convert", "--model=t5", *a],
                                  check=True, capture_output=True, text=True)
  run(f"--src={T5_DIR}", f"--dst={tmp_path / 'o'}", "--precision=fp32")
  run(f"--src={tmp_path / 'o'}", f"--dst={tmp_path / 'hf'}", "--to=official")
  a, b = ShardedCheckpoint(T5_DIR), ShardedCheckpoint(str(tmp_path / "hf"))
  assert sorted(a.keys()) == sorted(b.keys())
  for k in a.keys():
    np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_conventions():
  tok = T5Tokenizer(T5_DIR)
  ids, mask = tok(["", "a cat sleeps on a mat " * 10], 12)
  chex.assert_shape([ids, mask], (2, 12))
  np.testing.assert_array_equal(ids[0], [1] + [0] * 11)
  np.testing.assert_array_equal(mask[0], [1] + [0] * 11)
  assert ids[1, -1] == 1 and mask[1].all()                  # truncated to 11 pieces + </s>
  assert ids[1, :11].tolist() == tok.pieces("a cat sleeps on a mat " * 10)[:11]
  with pytest.raises(TypeError, match="str"):
    tok([None], 8)


def test_tokenizer_missing_files(tmp_path):
  with pytest.raises(TokenizerError, match="spiece.model"):
    T5Tokenizer(str(tmp_path))
  (tmp_path / "spiece.model").write_bytes(b"garbage")
  with pytest.raises(TokenizerError, match="SentencePiece"):
    T5Tokenizer(str(tmp_path))


# ---------------------------------------------------------------- special tokens and rows

def _npz(tmp_path, dim=8, **override):
  rng = np.random.default_rng(1)
  arrays = {"caption_token": rng.normal(0, 0.125, (1, dim)),
            "logo_token": rng.normal(0, 0.125, (1, dim)),
            "other_tokens": rng.normal(0, 0.125, (100, dim))}
  arrays.update(override)
  path = str(tmp_path / "special_tokens.npz")
  np.savez(path, **arrays)
  return path, arrays


def test_special_tokens_are_rounded_through_float16(tmp_path):
  path, arrays = _npz(tmp_path)
  special_tokens = SpecialTokens.load(path)
  hq = special_tokens.token("HQ")
  assert hq.dtype == np.float32
  assert not np.array_equal(hq, arrays["other_tokens"][1].astype(np.float32))
  np.testing.assert_array_equal(hq, np.float16(arrays["other_tokens"][1]).astype(np.float32))
  np.testing.assert_array_equal(special_tokens.duration(3), special_tokens.other[9])
  np.testing.assert_array_equal(special_tokens.duration(20),     # clamps at DURATION_8
                                special_tokens.other[14])


def test_special_token_file_errors(tmp_path):
  with pytest.raises(SpecialTokenError, match="not found"):
    SpecialTokens.load(str(tmp_path / "none.npz"))
  path, _ = _npz(tmp_path, other_tokens=np.zeros((99, 8)))
  with pytest.raises(SpecialTokenError, match="other_tokens"):
    SpecialTokens.load(path)
  np.savez(path, caption_token=np.zeros((1, 8)))
  with pytest.raises(SpecialTokenError, match="logo_token"):
    SpecialTokens.load(path)
  with open(path, "wb") as f:
    f.write(b"not a zip")
  with pytest.raises(SpecialTokenError, match="readable"):
    SpecialTokens.load(path)


def test_flags_from_environment():
  assert TextFlags.from_env({}) == TextFlags.none()
  f = TextFlags.from_env({"PAD_HQ": "yes", "PAD_DURATION": "1", "PAD_STATIC": "off"})
  assert f == TextFlags() and f.positive_keys() == ("HQ", "DURATION")


def test_rows_layout_with_a_prefix_and_negative_tokens(tmp_path):
  special_tokens = SpecialTokens.load(_npz(tmp_path)[0])
  L, D = 60, 8
  emb = np.arange(L * D, dtype=np.float32).reshape(1, L, D)
  mask = np.zeros((1, L))
  mask[0, :5] = 1
  null = -np.ones((L, D), np.float32)
  y, m = build_text_rows(emb, mask, null, infer_chunk_num=4, clean_chunk_num=1,
                         special=special_tokens, flags=TextFlags(neg_prompt=True))
  chex.assert_shape(y, (2, 4, L, D))
  chex.assert_shape(m, (2, 4, L))
  np.testing.assert_array_equal(y[0, 0], null)                  # clean chunk: null, mask 0
  assert m[0, 0].sum() == 0
  for i, k in enumerate([3, 2, 1]):                             # DURATION counts down
    np.testing.assert_array_equal(y[0, 1 + i, 0], special_tokens.duration(k))
    np.testing.assert_array_equal(y[0, 1 + i, 1], special_tokens.token("HQ"))
    np.testing.assert_array_equal(y[0, 1 + i, 2:], emb[0, :L - 2])
    assert m[0, 1 + i].sum() == 7
  np.testing.assert_array_equal(y[1, 2, :4], np.stack([special_tokens.token(k) for k in
                                                       ("BORDERNESS", "TRANS", "LOGO", "CAPTION")]))
  assert (m[1].sum(-1) == NULL_CAPTION_VALID).all()
  with pytest.raises(ValueError, match="special tokens"):
    build_text_rows(emb, mask, null, infer_chunk_num=2, special=None)


# ---------------------------------------------------------------- per-chunk prompts

def test_prompt_schedule_and_errors():
  sched = [("a cat", 0, 2), {"prompt": "a dog", "start": 2, "end": 3}]
  assert prompts_per_chunk(sched, 3) == ["a cat", "a cat", "a dog"]
  assert prompts_per_chunk("x", 2) == ["x", "x"]
  with pytest.raises(PromptScheduleError, match=r"\[2\]"):
    prompts_per_chunk([("a", 0, 2)], 3)
  with pytest.raises(PromptScheduleError, match="two prompts"):
    prompts_per_chunk([("a", 0, 2), ("b", 1, 3)], 3)
  with pytest.raises(PromptScheduleError, match="inside"):
    prompts_per_chunk([("a", 0, 4)], 3)


def test_per_chunk_prompts_give_their_own_rows(tmp_path):
  enc = load_text_encoder(T5_DIR, max_length=24, cache_dir=str(tmp_path / "c"))
  null = np.zeros((24, 64), np.float32)
  rows = chunk_text_rows(enc, [("a red ball falls", 0, 1), ("the blue cube rolls", 1, 2)],
                         null, infer_chunk_num=2, clean_chunk_num=0, flags=TextFlags.none())
  a, ma = enc.encode(["a red ball falls"])
  b, _ = enc.encode(["the blue cube rolls"])
  np.testing.assert_array_equal(rows.cond(0)[0], a[0])
  np.testing.assert_array_equal(rows.cond(1)[0], b[0])
  np.testing.assert_array_equal(rows.cond(0)[1], ma[0])


# ---------------------------------------------------------------- encoder facade and cache

def test_text_encoder_matches_the_official_rows_and_zeroes_pad_rows():
  d = _fixture_io()
  with open(os.path.join(FIXTURES, "text", "t5_io.json")) as f:
    prompts = [p["prompt"] for p in json.load(f)["prompts"]]
  enc = load_text_encoder(T5_DIR, max_length=24)
  emb, mask = enc.encode(prompts)
  np.testing.assert_array_equal(mask, d["t5.attention_mask"])
  valid = mask == 1
  np.testing.assert_allclose(emb[valid], d["t5.last_hidden_state"][valid], atol=1e-5)
  assert not emb[~valid].any()


def test_embedding_cache_skips_the_encoder_and_survives_corruption(tmp_path, caplog):
  cache = str(tmp_path / "cache")
  enc = load_text_encoder(T5_DIR, max_length=24, cache_dir=cache)
  first, m1 = enc.encode(["A cat on a mat", "A cat on a mat", "a dog"])
  assert enc.encoder_calls == 2                          # repeats are encoded once
  again = load_text_encoder(T5_DIR, max_length=24, cache_dir=cache)
  second, m2 = again.encode(["A cat on a mat", "a dog"])
  assert again.encoder_calls == 0 and again.cache.hits == 2
  np.testing.assert_array_equal(second, first[1:])
  np.testing.assert_array_equal(m2, m1[1:])
  other = load_text_encoder(T5_DIR, max_length=16, cache_dir=cache)
  other.encode(["a dog"])
  assert other.encoder_calls == 1                        # settings are part of the key
  for root, _, files in os.walk(cache):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"corrupt")
  third = load_text_encoder(T5_DIR, max_length=24, cache_dir=cache)
  emb, _ = third.encode(["a dog"])
  assert third.encoder_calls == 1 and "unreadable" in caplog.text
  np.testing.assert_array_equal(emb[0], first[2])
