"""The DiT streaming smoke run (see experiments/configs/dit_smoke.py for command and result)."""

from absl import app

from magi_jax import cli

_CONFIG = cli.config_file_flag("config", "experiments/configs/dit_smoke.py",
                                          "experiment config file")


def main(argv):
  del argv
  from magi_jax.models import stream_check
  from magi_jax.configs import get_preset

  c = _CONFIG.value
  if c.kv_window < 1:
    raise app.UsageError(f"--config.kv_window must be >= 1, got {c.kv_window}")
  reports, tokens_per_chunk = stream_check.run(get_preset(c.preset), num_chunks=c.num_chunks,
                                  latent_h=c.latent_h, latent_w=c.latent_w,
                                  kv_window=c.kv_window, backend=c.backend,
                                  precision=c.precision, seed=c.seed)
  worst = max(r.max_abs_diff for r in reports)
  steady = [r.cache_bytes for r in reports[c.kv_window - 1:]] or [reports[-1].cache_bytes]
  # Chunks before kv_window see a cache of a new size and compile; time the others.
  timed = reports[c.kv_window:] or reports
  tps = tokens_per_chunk * len(timed) / sum(r.seconds for r in timed)
  ok = worst <= c.tolerance
  print(f"tokens/s (chunks with an already-compiled shape): {tps:,.0f}")
  print(f"KV cache bytes once the window is full: min {min(steady)}, max {max(steady)}")
  print(f"streamed == full forward: max |diff| {worst:.2e} ({'PASS' if ok else 'FAIL'})")
  if not ok:
    raise SystemExit(1)


if __name__ == "__main__":
  cli.run(main)
