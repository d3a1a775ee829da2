"""Special tokens in training (`text.special_tokens`): every noisy chunk's precomputed T5 rows get
the tokens sampling gives them, so a fine-tuned official model trains on the captions it is
sampled with. Checked against the sampler's own rows (`ChunkTextRows.cond`) chunk by chunk in a
packed batch of videos of several lengths, and the config's wiring and refusals.
"""

from __future__ import annotations

import numpy as np
import pytest

from experiments.configs.finetune_lora import get_config
from magi_jax.configs import ConfigError
from magi_jax.text.rows import ChunkTextRows, TokenHead
from magi_jax.text.special_tokens import SpecialTokens, TextFlags
from magi_jax.train import build
from magi_jax.train.objective import with_token_head

D, L = 8, 12


def special(seed=0, dim=D):
  rng = np.random.default_rng(seed)
  return SpecialTokens.from_arrays(rng.normal(size=(1, dim)), rng.normal(size=(1, dim)),
                                   rng.normal(size=(100, dim)))


@pytest.mark.parametrize("flags", [TextFlags(), TextFlags(static=True, three_d_model=True),
                                   TextFlags(duration=False)])
def test_each_chunk_gets_the_rows_sampling_gives_it(flags):
  sp = special()
  head = TokenHead.build(sp, flags)
  # Two packed rows: videos of 3 + 1 chunks, and one of 10 chunks (DURATION is capped at 8).
  seg = np.array([[1, 1, 1, 2] + [0] * 6, [1] * 10])
  rng = np.random.default_rng(1)
  n_valid = rng.integers(3, L, size=seg.shape)
  mask = (np.arange(L)[None, None] < n_valid[..., None]).astype(np.float32)
  emb = rng.normal(size=seg.shape + (L, D)).astype(np.float32) * mask[..., None]
  y, m = with_token_head(emb.reshape(-1, L, D), mask.reshape(-1, L), seg, head)
  y, m = np.asarray(y).reshape(seg.shape + (L, D)), np.asarray(m).reshape(seg.shape + (L,))
  for r, videos in ((0, [(0, 3), (3, 1)]), (1, [(0, 10)])):
    for start, n in videos:
      for clean in range(n):              # sampling with `clean` leading clean chunks
        rows = ChunkTextRows(emb[r, start + clean:start + n], mask[r, start + clean:start + n],
                             np.zeros((L, D)), infer_chunk_num=n, clean_chunk_num=clean,
                             special=sp, flags=flags)
        for chunk in range(clean, n):
          want_y, want_m = rows.cond(chunk)
          np.testing.assert_allclose(y[r, start + chunk], want_y, rtol=1e-6, atol=1e-6)
          np.testing.assert_array_equal(m[r, start + chunk], want_m)


def test_the_config_wires_the_official_tokens(tmp_path):
  path = str(tmp_path / "special_tokens.npz")
  sp = special(dim=64)
  np.savez(path, caption_token=sp.caption[None], logo_token=sp.logo[None], other_tokens=sp.other)
  c = get_config("rehearsal")
  assert build.objective(c).special is None
  c.text.special_tokens = path
  head = build.objective(c).special
  assert head.rows.shape == (2, 64) and head.duration_at == 0        # [DURATION_k, HQ, ...]
  np.testing.assert_array_equal(head.rows[1], sp.token("HQ"))
  c.text.special_token_flags = "hq,loud"
  with pytest.raises(ConfigError, match=r"config\.text\.special_token_flags: unknown \['loud'\]"):
    build.objective(c)
  c.text.special_token_flags = "hq,duration"
  np.savez(path, caption_token=sp.caption[None, :8], logo_token=sp.logo[None, :8],
           other_tokens=sp.other[:, :8])
  with pytest.raises(ConfigError, match="tokens of width 8, the DiT's caption rows are 64 wide"):
    build.objective(c)
  c.text.kind = "demo"
  with pytest.raises(ConfigError, match="special tokens go before precomputed T5 rows"):
    build.token_head(c)
