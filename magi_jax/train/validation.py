"""The validation loss: the training loss on the held-out split, per noise-level bucket, every
`validation.every` steps (the report switches stages when it stops falling).

The held-out split is the "val" groups that `experiments.prepare` set aside
(`data.val_fraction`: files chosen by a hash of their name). The first `validation.batches`
batches of its mixed streams are read once and kept on the host, and every evaluation draws
the same conditioning and noise for them (`fold_in(key(seed), batch index)`), so two points of
the curve differ only by the weights. The loss is the objective's own (`Objective.loss`),
under the run's mesh and compute dtype, on the trained (not EMA) parameters: the weights whose
progress decides a stage switch.

Written to TensorBoard as `val/loss` and `val/loss_t/<a>-<b>` (T_BUCKETS of the objective), to
`<workdir>/validation.jsonl`, and as a log line.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from magi_jax.configs import ConfigError
from magi_jax.train.metrics import bucket_names
from magi_jax.train.step import model_batch, weights_loss

VAL_SEED = 0x5EED


def held_out_batches(c, echo=print) -> list[dict]:
  """The first validation.batches batches of the prepared "val" split (this process's share)."""
  if c.data.kind != "prepared":
    raise ConfigError(f"validation.every={c.validation.every} needs a held-out split: train on "
                      "prepared data (data.kind='prepared') made with data.val_fraction > 0")
  from magi_jax.data.prepared.records import PreparedSource
  from magi_jax.train.data import common_kwargs, prepared_streams
  source = PreparedSource(c.data.prepared_dir)
  if not any(g.startswith("val/") for g in source.groups()):
    raise ConfigError(f"validation.every={c.validation.every}: {c.data.prepared_dir} has no "
                      "held-out split; prepare it with --config.data.val_fraction=0.01 (or more)")
  it = prepared_streams(c, source, common_kwargs(c, num_threads=0), split="val", echo=echo)
  n = int(c.validation.batches)
  if n < 1:
    raise ConfigError(f"validation.batches must be >= 1, got {n}")
  return [next(it) for _ in range(n)]


def make_eval_step(graphdef, obj, *, compute_dtypes=None, latent_scale: float, shardings):
  """(params, frozen, batch, index) -> (loss, aux) of the objective, jitted on the mesh."""
  sh = shardings
  loss_of = weights_loss(graphdef, obj, compute_dtypes)

  @functools.partial(jax.jit, in_shardings=(sh.state.params, sh.frozen, sh.batch, None),
                     out_shardings=sh.replicated)
  def evaluate(params, frozen, batch, index):
    key = jax.random.fold_in(jax.random.key(VAL_SEED), index)
    return loss_of(params, frozen, model_batch(batch, None, latent_scale), key, 0)

  return evaluate


def summarize(results) -> dict:
  """[(loss, aux)] of the batches -> {"val/loss", "val/loss_t/<bucket>"}: the loss weighted by
  noisy frames, each bucket the mean of its chunk losses."""
  frames = np.array([float(a["noisy_frames"]) for _, a in results])
  losses = np.array([float(l) for l, _ in results])
  out = {"val/loss": float((losses * frames).sum() / max(frames.sum(), 1.0))}
  sums = np.sum([np.asarray(a["bucket_loss_sum"]) for _, a in results], axis=0)
  counts = np.sum([np.asarray(a["bucket_count"]) for _, a in results], axis=0)
  for name, s, n in zip(bucket_names(), sums, counts):
    if n:
      out[f"val/{name}"] = float(s / n)
  return out


class Validator:
  """validate(state, frozen, step) -> the summary, logged; the batches are read once."""

  def __init__(self, c, graphdef, obj, *, compute_dtypes, shardings, place, echo=print):
    self.batches = [place(b) for b in held_out_batches(c, echo)]
    self.evaluate = make_eval_step(graphdef, obj, compute_dtypes=compute_dtypes,
                                   latent_scale=float(c.vae.scale_factor), shardings=shardings)
    self.echo = echo

  def __call__(self, state, frozen, step: int, log=None) -> dict:
    results = [self.evaluate(state.params, frozen, b, jnp.int32(i))
               for i, b in enumerate(self.batches)]
    out = summarize(jax.device_get(results))
    if log is not None:
      log.scalars(step, out, "validation.jsonl")
    parts = [f"{k.split('/', 1)[1].replace('loss_t/', 't ')} {v:.4f}"
             for k, v in out.items() if k != "val/loss"]
    self.echo(f"validation at step {step}: loss {out['val/loss']:.4f}  " + "  ".join(parts))
    return out
