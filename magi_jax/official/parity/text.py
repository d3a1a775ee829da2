"""`text`: caption cleaning, tokenisation, the T5 encoder and the special-token rows.

Fixtures (layout: shared/fixtures/text/README.md) come from the official T5Embedder and
`extract_feature_for_inference` with a tiny random T5: the cleaner's strings and the token ids
must be identical, the encoder output (every row, pad rows included) within 1e-5 in float32
(the reference's own fp32-vs-fp64 spread is 2e-6), and the per-chunk `y` / `emb_masks` exact.
"""

from __future__ import annotations

import json
import os

import numpy as np

from magi_jax.official.parity import fixtures
from magi_jax.official.parity.compare import Result, compare

FILE = os.path.join("text", "t5_io.safetensors")
ATOL, RTOL = 1e-5, 1e-5


def _exact(name: str, got, want) -> Result:
  return compare(name, np.asarray(got), np.asarray(want), atol=0.0, rtol=0.0)


def _strings(name: str, pairs) -> Result:
  bad = [(i, got, want) for i, (got, want) in enumerate(pairs) if got != want]
  note = f"{len(pairs)} pairs"
  if bad:
    i, got, want = bad[0]
    note += f"; {len(bad)} differ, first #{i}: {got!r} != {want!r}"
  return Result(name, float(len(bad)), float(len(bad)), not bad, note)


def run(directory: str, *, activations: bool = False, backend: str = "reference"):
  del backend
  from magi_jax.official.t5 import load_t5
  from magi_jax.text.clean_caption import clean_caption, preprocess_prompt
  from magi_jax.text.rows import build_text_rows
  from magi_jax.text.special_tokens import SpecialTokens, TextFlags
  from magi_jax.text.tokenizer import T5Tokenizer

  text_dir = os.path.join(directory, "text")
  results = []
  clean_path = os.path.join(text_dir, "clean_caption.json")
  if os.path.exists(clean_path):
    with open(clean_path) as f:
      pairs = json.load(f)["pairs"]
    results.append(_strings("text/clean_caption (one pass)",
                            [(clean_caption(p["input"]), p["after_one_pass"]) for p in pairs]))
    results.append(_strings("text/clean_caption (twice, as the pipeline)",
                            [(preprocess_prompt(p["input"]), p["output"]) for p in pairs]))

  d, meta = fixtures.tensors(directory, FILE)
  with open(fixtures.path(text_dir, "t5_io.json")) as f:
    info = json.load(f)
  max_length = int(meta["max_length"])
  ckpt = os.path.join(text_dir, "t5_tiny")
  tok = T5Tokenizer(ckpt)
  cleaned = [p["cleaned"] for p in info["prompts"]]
  results.append(_strings("text/clean_caption (t5_io prompts)",
                          [(preprocess_prompt(p["prompt"]), p["cleaned"])
                           for p in info["prompts"]]))
  ids, mask = tok(cleaned, max_length)
  results.append(_exact("text/token_ids", ids, d["t5.input_ids"]))
  results.append(_exact("text/attention_mask", mask, d["t5.attention_mask"]))
  raw_ids, raw_mask = tok([p["prompt"] for p in info["prompts"]], max_length)
  results.append(_exact("text/token_ids (raw prompts)", raw_ids, d["tok_raw.input_ids"]))
  results.append(_exact("text/attention_mask (raw prompts)", raw_mask, d["tok_raw.attention_mask"]))

  t5 = load_t5(ckpt)
  out, acts = t5(d["t5.input_ids"], d["t5.attention_mask"], return_activations=True)
  results.append(compare("text/t5_last_hidden_state", out, d["t5.last_hidden_state"],
                         atol=ATOL, rtol=RTOL))
  valid = d["t5.attention_mask"] == 1
  results.append(compare("text/t5_last_hidden_state (mask==1 rows, vs f64)",
                         np.asarray(out)[valid], d["t5.last_hidden_state.f64"][valid],
                         atol=ATOL, rtol=RTOL))
  if activations:
    for name in ("embed", "rel_bias") + tuple(f"block.{i}" for i in range(t5.cfg.num_layers)):
      key = f"t5.act.{name}"
      if key in d:
        results.append(compare(f"text/act/{name}", acts[name], d[key], atol=ATOL, rtol=RTOL))

  rows_path = os.path.join(text_dir, "text_rows.safetensors")
  if os.path.exists(rows_path):
    r, _ = fixtures.tensors(text_dir, "text_rows.safetensors")
    with open(fixtures.path(text_dir, "text_rows.json")) as f:
      cases = json.load(f)["cases"]
    special = SpecialTokens.from_arrays(r["in.special.caption_token"], r["in.special.logo_token"],
                                        r["in.special.other_tokens"])
    for case in cases:
      name = case["name"]
      flags = TextFlags.from_env(dict.fromkeys(case["flags"], "1"))
      y, m = build_text_rows(r["in.caption_embs"][0], r[f"{name}.in.emb_masks"],
                             r["in.null_caption_embedding"],
                             infer_chunk_num=case["infer_chunk_num"],
                             clean_chunk_num=case["clean_chunk_num"], special=special, flags=flags)
      results.append(_exact(f"text/rows/{name}/y", y, r[f"{name}.out.y"]))
      results.append(_exact(f"text/rows/{name}/emb_masks", m, r[f"{name}.out.emb_masks"]))
  return results
