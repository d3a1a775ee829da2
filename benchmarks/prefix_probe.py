"""Does a trained bouncing-shapes model use its clean prefix? The teacher-forced probe of issue 15.

For held-out episodes of one evaluation block, the DiT gets chunks 0 .. K-1 clean (as training
and the sampler's cache present them: t = 1, no text; K = `--chunk`, 1 by default) and chunk K
noised to level t, with chunk K's caption, through the training forward
(`objective.velocity_of_row`); its clean prediction of chunk K is scored against the truth next
to copy-last-frame and constant velocity, and once more with another episode's prefix (a model
that ignores its prefix scores the same there). The centre uses threshold 20 so that a faint,
uncertain blob still has a centre (the evaluator's threshold 80 scores a faint prediction as
blank).

  python benchmarks/prefix_probe.py --workdir=runs/bouncing_tiny --eval_seed=1

Measured 2026-12-05 (block 1, 32 episodes, t = 0): sorted levels at 1,300 steps 7.78 px (8.37
with another prefix), staggered levels at 2,600 steps 1.57 px (7.78); copy-last 3.00
(constant velocity 1.47 at the evaluator's threshold 80).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/bouncing_tiny", "trained bouncing run")
_BLOCK = flags.DEFINE_integer("eval_seed", 1, "held-out block", lower_bound=0)
_NUM = flags.DEFINE_integer("num_episodes", 32, "episodes", lower_bound=2)
_LEVELS = flags.DEFINE_list("levels", ["0", "0.1", "0.2", "0.3"], "levels t of the chunk")
_CHUNK = flags.DEFINE_integer("chunk", 1, "the predicted chunk K (chunks before it are clean "
                              "truth)", lower_bound=1)
THRESHOLD = 20.0


def main(argv):
  del argv
  from magi_jax.diffusion.conditioning import Conditioning
  from magi_jax.proj.bouncing import metrics as bm
  from magi_jax.proj.bouncing.evaluation import held_out
  from magi_jax.proj.bouncing.training import world_config
  from magi_jax.train.objective import Objective, velocity_of_row
  from magi_jax.train.samples import frames_to_latent, latent_to_frames
  from magi_jax.train.trainer import load_trained

  c, model, tok, step = load_trained(_WORKDIR.value, use_ema=False)
  if c.model.prediction != "clean":
    raise app.UsageError("the probe reads a clean-sample prediction; this run predicts "
                         f"{c.model.prediction!r}")
  F, n, K = c.objective.chunk_width, _NUM.value, _CHUNK.value
  num_chunks = world_config(c).num_frames // F
  if K >= num_chunks:
    raise app.UsageError(f"--chunk={K}: the run's episodes have {num_chunks} chunks")
  obj = Objective(chunk_width=F, prediction="clean", backend=c.model.backend)
  eps = [held_out(c, i, _BLOCK.value) for i in range(n)]
  x1 = jnp.concatenate([frames_to_latent(e.frames[:(K + 1) * F]) for e in eps])
  ids, mask = tok([e.chunk_captions[k] for e in eps for k in range(K + 1)])
  L = ids.shape[-1]
  text = {"segment_ids": jnp.ones((n, K + 1), jnp.int32),
          "text_tokens": jnp.asarray(ids).reshape(n, K + 1, L),
          "text_mask": jnp.asarray(mask).reshape(n, K + 1, L)}
  pair = jnp.array([[True] * K + [False]] * n)

  @jax.jit
  def predict(x1, level):
    t = jnp.concatenate([jnp.ones((n, K)), jnp.full((n, 1), level)], 1)
    cond = Conditioning(t=t, clean=pair, text_drop=pair, frame_t=jnp.repeat(t, F, 1),
                        frame_weight=jnp.repeat((~pair).astype(jnp.float32), F, 1))
    x0 = jax.random.normal(jax.random.key(0), x1.shape)
    return velocity_of_row(model, {"x1": x1, **text}, cond, x0, obj)[0]

  def score(out):
    got = [bm.centre_error(latent_to_frames(out[i:i + 1])[K * F:], e.frames[K * F:(K + 1) * F],
                           threshold=THRESHOLD).mean() for i, e in enumerate(eps)]
    return float(np.mean(got))

  copy = np.mean([bm.centre_error(bm.copy_last_frame(e.frames[:K * F], F),
                                  e.frames[K * F:(K + 1) * F], threshold=THRESHOLD).mean()
                  for e in eps])
  swapped = jnp.concatenate([jnp.roll(x1[:, :, :K * F], 1, axis=0), x1[:, :, K * F:]], axis=2)
  print(f"{_WORKDIR.value} step {step}, block {_BLOCK.value}, {n} episodes; centre error of "
        f"chunk {K} (px, threshold {THRESHOLD:g}); copy-last {copy:.2f}")
  print("| t | model | model / copy-last | another episode's prefix |")
  print("|---:|---:|---:|---:|")
  for s in _LEVELS.value:
    level = float(s)
    m = score(predict(x1, level))
    o = score(predict(swapped, level))
    print(f"| {level:g} | {m:.2f} | {m / copy:.2f}x | {o:.2f} |")


if __name__ == "__main__":
  app.run(main)
