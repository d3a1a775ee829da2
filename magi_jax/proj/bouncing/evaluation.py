"""Evaluating a bouncing-shapes model with the autoregressive sampler (the demo's targets).

* Continuation (V2V): the first `prefix_chunks` chunks of a held-out episode are given clean;
  the sampler generates the rest. Reported against the true future: ball-centre error per
  frame (model vs copy-last-frame vs constant velocity), pixel MSE (model vs blank vs
  copy-last) and the bright-pixel count ratio (shape check: blur and speckle both change it).
* Text control (T2V): from the captions alone; the dominant object colour of the generated
  video must be the colour the caption names.
* Long rollouts (`rollout`): continuations past the training length (8 chunks for a world of
  4); per generated chunk the centre error (model vs the two baselines) and whether the
  object is still one object of its colour (`metrics.chunk_drift`): the drift curve.

Held-out means the test split of `bouncing_shapes` (seeds disjoint from training); episodes
are re-simulated from their seeds, which is what the TFDS test split stores.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from magi_jax.proj.bouncing.world import simulate
from magi_jax.proj.bouncing.tfds_builder import split_seed
from magi_jax.proj.bouncing import metrics as bm
from magi_jax.proj.bouncing.training import world_config
from magi_jax.train import build
from magi_jax.train.samples import VideoSampler

TARGETS = {"text_control_accuracy": 0.9, "bright_ratio_band": 0.5,
           "rollout_one_object": 0.9}


# `--eval_seed=N` evaluates on block N of the held-out episodes: test-split indices
# [N·BLOCK, (N+1)·BLOCK), so blocks never share an episode (and the test split's seeds never
# meet the training seeds: tfds_builder.split_seed). Block 0 is what the demo was tuned on.
BLOCK = 10_000


def held_out(c, i: int, block: int = 0, num_chunks: int | None = None):
  """Held-out episode `i` of evaluation block `block`, simulated for `num_chunks` chunks
  (default: the config's). A longer episode is the same world run on: its seed draws the same
  initial state and the physics is step by step, so its first frames are the normal episode's
  (only the caption of the normal episode's last chunk can differ, by an event in the half
  frame after its last frame, which the longer run assigns to that frame)."""
  if not 0 <= i < BLOCK:
    raise ValueError(f"held-out episode {i} is outside a block of {BLOCK}")
  if block < 0:
    raise ValueError(f"evaluation block {block} must be >= 0")
  world = world_config(c)
  if num_chunks is not None:
    if num_chunks < 1:
      raise ValueError(f"num_chunks {num_chunks} must be >= 1")
    world = dataclasses.replace(world, num_frames=num_chunks * world.frames_per_chunk)
  return simulate(world, split_seed("test", block * BLOCK + i))


def single_object_episodes(c, block: int = 0, first: int = 0, num_chunks: int | None = None):
  """(k, episode) for the held-out episodes first + k, k = 0, 1, ..., of block `block` that
  hold one object (the others are skipped; k still counts them)."""
  k = 0
  while True:
    ep = held_out(c, first + k, block, num_chunks)
    if len(ep.objects) == 1:
      yield k, ep
    k += 1


def make_sampler(c, model, tokenizer) -> VideoSampler:
  """T2V samples use `sample.text_scale`; continuations pass `sample.v2v_text_scale` per call
  (the prefix already fixes the object, and strong text guidance on a tiny model adds
  speckle)."""
  return VideoSampler(model, tokenizer, chunk_width=c.objective.chunk_width,
                      prediction=c.model.prediction, settings=build.sample_settings(c),
                      backend=c.model.backend)


def sample_set(c, model, tokenizer, *, num: int):
  """Half continuations, half caption-only videos of held-out episodes (for the strips)."""
  sampler = make_sampler(c, model, tokenizer)
  world = world_config(c)
  F, K = world.frames_per_chunk, world.num_chunks
  videos, names = [], []
  for i in range(num):
    ep = held_out(c, i)
    if i % 2 == 0:
      P = c.sample.prefix_chunks * F
      v = sampler.generate(ep.chunk_captions, num_chunks=K, height=world.height,
                           width=world.width, seed=i, prefix_frames=ep.frames[:P],
                           text_scale=c.sample.v2v_text_scale)
      names.append(f"v2v{i:02d}")
      videos.append(np.concatenate([ep.frames, v], axis=2))    # truth | sample side by side
    else:
      v = sampler.generate(ep.chunk_captions, num_chunks=K, height=world.height,
                           width=world.width, seed=i)
      names.append(f"t2v{i:02d}_{ep.objects[0][0]}")
      videos.append(v)
  return videos, names


def step_counts(values, default: int) -> list[int]:
  """Sampler step counts from strings (e.g. a `--num_steps=8,16` list; empty: [default]);
  ValueError naming a bad entry."""
  out = []
  for v in values or [str(default)]:
    try:
      n = int(v)
    except ValueError:
      n = 0
    if n <= 0:
      raise ValueError(f"{v!r} is not a positive step count")
    out.append(n)
  return out


def network_evaluations_per_chunk(sampler: VideoSampler) -> int:
  """DiT evaluations a chunk costs: its denoising steps x guidance passes (cfg_number)."""
  rt = sampler.cfg.runtime
  return int(rt.num_steps) * int(rt.cfg_number)


def evaluate(c, model, tokenizer, *, num_continuations: int, num_text: int, block: int = 0,
             echo=print) -> dict:
  """The demo's figures (module docstring) with the config's sampler settings on evaluation
  block `block` (continuations: its first episodes, text control: the ones after), plus the
  sampler's cost: network evaluations per chunk and the wall time per generated chunk of the
  continuations (the first one, which compiles, left out)."""
  world = world_config(c)
  palette = dict(world.colours)
  sampler = make_sampler(c, model, tokenizer)
  F, K = world.frames_per_chunk, world.num_chunks
  P = c.sample.prefix_chunks * F
  reports, seconds = [], []
  for i in range(num_continuations):
    ep = held_out(c, i, block)
    t0 = time.perf_counter()
    v = sampler.generate(ep.chunk_captions, num_chunks=K, height=world.height,
                         width=world.width, seed=i, prefix_frames=ep.frames[:P],
                         text_scale=c.sample.v2v_text_scale)
    seconds.append(time.perf_counter() - t0)       # generate returns host frames: synced
    reports.append(bm.continuation_report(v[P:], ep.frames[P:], ep.frames[:P]))
  cont = {k: float(np.mean([r[k] for r in reports])) for k in reports[0]} if reports else {}
  timed = seconds[1:]
  per_chunk = (float(np.sum(timed)) / (len(timed) * (K - c.sample.prefix_chunks))
               if timed else float("nan"))

  hits, colours = [], []
  episodes = single_object_episodes(c, block, first=num_continuations)
  while len(hits) < num_text:
    k, ep = next(episodes)
    v = sampler.generate(ep.chunk_captions, num_chunks=K, height=world.height, width=world.width,
                         seed=10_000 + k + 1)
    want = ep.objects[0][0]
    got = bm.dominant_colour(v, palette)
    hits.append(got == want)
    colours.append((want, got))
  acc = float(np.mean(hits)) if hits else float("nan")
  rt = sampler.cfg.runtime
  out = {"continuation": cont, "text_control_accuracy": acc, "text_control_pairs": colours,
         "num_continuations": num_continuations, "num_text": num_text, "eval_seed": block,
         "num_steps": int(rt.num_steps), "cfg_number": int(rt.cfg_number),
         "network_evaluations_per_chunk": network_evaluations_per_chunk(sampler),
         "seconds_per_chunk": per_chunk}
  out["targets"] = targets_met(out)
  return out


def targets_met(r: dict) -> dict:
  c = r["continuation"]
  return {
      "text_control>=0.9": r["text_control_accuracy"] >= TARGETS["text_control_accuracy"],
      "centre_error<copy_last": c["centre_error_model"] < c["centre_error_copy_last"],
      "bright_ratio_within_50%": abs(c["bright_ratio_model"] - 1.0) <= TARGETS["bright_ratio_band"],
  }


def format_report(r: dict) -> str:
  c = r["continuation"]
  lines = [
      f"continuation ({r['num_continuations']} held-out episodes of block "
      f"{r.get('eval_seed', 0)}, per generated frame):",
      f"  ball-centre error  model {c['centre_error_model']:.2f} px   copy-last "
      f"{c['centre_error_copy_last']:.2f} px   constant-velocity "
      f"{c['centre_error_const_velocity']:.2f} px",
      f"  pixel MSE          model {c['mse_model']:.4f}   blank {c['mse_blank']:.4f}   "
      f"copy-last {c['mse_copy_last']:.4f}",
      f"  bright pixels      model/truth {c['bright_ratio_model']:.2f}   copy-last/truth "
      f"{c['bright_ratio_copy_last']:.2f}",
      f"text control ({r['num_text']} caption-only videos): {r['text_control_accuracy']:.0%} "
      "dominant colour = caption colour",
      f"sampler: {r['num_steps']} steps x {r['cfg_number']} guidance pass(es) = "
      f"{r['network_evaluations_per_chunk']} network evaluations per chunk, "
      f"{r['seconds_per_chunk'] * 1e3:.0f} ms per generated chunk",
      "targets: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in r["targets"].items()),
  ]
  return "\n".join(lines)


def rollout(c, model, tokenizer, *, num_episodes: int, chunks: int = 8, block: int = 0) -> dict:
  """Long-rollout drift on the first `num_episodes` single-object held-out episodes of block
  `block` (multi-object ones are skipped, as for text control: "one object of the right
  colour" is only defined with one object). Each episode is simulated for `chunks` chunks
  (`held_out(..., num_chunks=chunks)`: the same world as the training-length episode, run on);
  the sampler gets its first `sample.prefix_chunks` chunks clean and the chunk captions, and
  continues to `chunks` chunks with `sample.v2v_text_scale` (seed = the episode index, as in
  `evaluate`'s continuations). Chunks are numbered from 0 in the whole video; the generated
  ones are prefix_chunks .. chunks-1, and those >= the world's num_chunks are beyond the
  training length.

  Returns (JSON-ready):
    per_chunk: one row per generated chunk, means over the episodes: centre_error_model /
      _copy_last / _const_velocity (px per frame, `metrics.chunk_drift` and
      `metrics.baseline_centre_errors`), one_object_fraction (episodes whose chunk shows one
      object of the episode's colour in every frame), beyond_training;
    one_object_all_chunks: fraction of episodes where every generated chunk does (the
      target: >= TARGETS["rollout_one_object"]);
    episodes: per episode its index, colour and per-chunk centre_error / one_object;
    chunks, train_chunks, prefix_chunks, num_episodes, eval_seed, num_steps, targets.
  """
  world = world_config(c)
  F, K = world.frames_per_chunk, world.num_chunks
  prefix_chunks = int(c.sample.prefix_chunks)
  if num_episodes < 1:
    raise ValueError(f"num_episodes {num_episodes} must be >= 1")
  if chunks <= prefix_chunks:
    raise ValueError(f"a rollout of {chunks} chunks generates nothing after the "
                     f"{prefix_chunks} clean prefix chunk(s)")
  if world.min_objects > 1:
    raise ValueError(f"the rollout scores single-object episodes; this world has "
                     f"min_objects={world.min_objects}")
  palette = dict(world.colours)
  sampler = make_sampler(c, model, tokenizer)
  P = prefix_chunks * F
  episodes, model_err, copy_err, cv_err, ok = [], [], [], [], []
  candidates = single_object_episodes(c, block, num_chunks=chunks)
  while len(episodes) < num_episodes:
    i, ep = next(candidates)
    colour = ep.objects[0][0]
    v = sampler.generate(ep.chunk_captions, num_chunks=chunks, height=world.height,
                         width=world.width, seed=i, prefix_frames=ep.frames[:P],
                         text_scale=c.sample.v2v_text_scale)
    true, prefix = ep.frames[P:], ep.frames[:P]
    drift = bm.chunk_drift(v[P:], true, F, palette=palette, colour_name=colour)
    base = bm.baseline_centre_errors(true, prefix)
    model_err.append(drift["centre_error"])
    copy_err.append(bm.chunk_means(base["copy_last"], F))
    cv_err.append(bm.chunk_means(base["const_velocity"], F))
    ok.append(drift["one_object"])
    episodes.append({"index": i, "colour": colour,
                     "centre_error": [float(e) for e in drift["centre_error"]],
                     "one_object": [bool(b) for b in drift["one_object"]]})
  model_err, copy_err, cv_err, ok = map(np.asarray, (model_err, copy_err, cv_err, ok))
  rows = [{"chunk": prefix_chunks + j, "beyond_training": prefix_chunks + j >= K,
           "centre_error_model": float(model_err[:, j].mean()),
           "centre_error_copy_last": float(copy_err[:, j].mean()),
           "centre_error_const_velocity": float(cv_err[:, j].mean()),
           "one_object_fraction": float(ok[:, j].mean())}
          for j in range(chunks - prefix_chunks)]
  all_ok = float(ok.all(axis=1).mean())
  return {"chunks": chunks, "train_chunks": K, "prefix_chunks": prefix_chunks,
          "num_episodes": num_episodes, "eval_seed": block,
          "num_steps": int(sampler.cfg.runtime.num_steps), "per_chunk": rows,
          "one_object_all_chunks": all_ok, "episodes": episodes,
          "targets": {"rollout_one_object>=0.9": all_ok >= TARGETS["rollout_one_object"]}}


def format_rollout(r: dict) -> str:
  """The drift curve of a `rollout` report: a Markdown table, one row per generated chunk
  (chunks numbered from 0 in the video; * = beyond the training length), then the target."""
  lines = [
      f"long rollout: {r['num_episodes']} held-out single-object episodes of block "
      f"{r.get('eval_seed', 0)}, {r['prefix_chunks']} clean chunk(s) continued to "
      f"{r['chunks']} chunks (trained on {r['train_chunks']}; * = beyond), "
      f"{r['num_steps']} sampler steps",
      "",
      "| chunk | centre error model (px) | copy-last (px) | constant-velocity (px) "
      "| one object, right colour |",
      "|---:|---:|---:|---:|---:|",
  ]
  for row in r["per_chunk"]:
    mark = "*" if row["beyond_training"] else ""
    lines.append(f"| {row['chunk']}{mark} | {row['centre_error_model']:.2f} | "
                 f"{row['centre_error_copy_last']:.2f} | "
                 f"{row['centre_error_const_velocity']:.2f} | "
                 f"{row['one_object_fraction']:.0%} |")
  ok = r["targets"]["rollout_one_object>=0.9"]
  lines += ["", f"every generated chunk one object of the right colour: "
                f"{r['one_object_all_chunks']:.0%} of episodes (target >= "
                f"{TARGETS['rollout_one_object']:.0%}: {'PASS' if ok else 'FAIL'})"]
  return "\n".join(lines)
