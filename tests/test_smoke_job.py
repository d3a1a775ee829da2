"""The README's main job (experiments.dit_smoke) runs and its streaming check holds."""

from magi_jax.models import stream_check
from magi_jax.configs import get_preset


def test_streaming_equals_full_forward_with_flat_cache():
  reports, _ = stream_check.run(get_preset("tiny"), num_chunks=5, latent_h=8, latent_w=8,
                                kv_window=3, backend="blockwise", precision="fp32", seed=0,
                                log=lambda *_: None)
  assert max(r.max_abs_diff for r in reports) < 1e-4
  sizes = [r.cache_bytes for r in reports]
  assert sizes[2:] == [sizes[2]] * 3 and sizes[2] == 2 * sizes[0]   # bounded by kv_window - 1
