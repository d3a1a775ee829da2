"""A few demo train steps on a given device mesh, for the mesh equality tests.

Shared by tests/test_mesh_train.py (one process, 8 CPU devices) and
tests/multiprocess_worker.py (2 processes x 4 devices): the same config and the same global
batches, so every run must reach the same losses and parameters. Each process feeds the
trainer only its own rows of every global batch, as a real multi-host input pipeline does.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from experiments.configs import bouncing_tiny
from magi_jax.proj.bouncing.training import world_config
from magi_jax.train import build
from magi_jax.train.trainer import train

STEPS = 3
BATCH = 4


def config(mesh: dict, backend: str):
  c = bouncing_tiny.get_config("smoke")
  c.data.world = dict(c.data.world, num_frames=16)
  c.data.bin_chunks = 4                # 4 chunks: zig-zag ring placement on context = 2
  c.data.batch_size = BATCH
  c.model.overrides = dict(c.model.overrides, num_layers=2, num_attention_heads=4,
                           num_query_groups=2)
  c.model.backend = backend
  c.mesh = dict(c.mesh.to_dict(), **mesh)
  c.total_steps = STEPS
  c.log_every = 1
  c.checkpoint_every = STEPS
  c.async_checkpoints = False
  c.tensorboard = False
  c.sample_at_end = False
  return c


def global_batches(c, steps: int = STEPS):
  """Deterministic batches of the loader's format: 2 rows of one 4-chunk video, 2 packed rows."""
  rng = np.random.default_rng(0)
  world = world_config(c)
  K, F, L = c.data.bin_chunks, world.frames_per_chunk, c.text.max_length
  vocab = build.tokenizer_for(c).vocab_size
  seg = np.array([[1, 1, 1, 1], [1, 1, 2, 2], [1, 2, 2, 2], [1, 1, 2, 0]], np.int32)
  out = []
  for _ in range(steps):
    mask = np.zeros((BATCH, K, L), np.int32)
    mask[..., :5] = 1
    out.append({
        "frames": rng.integers(0, 256, (BATCH, K * F, world.height, world.width, 3), np.uint8),
        "segment_ids": seg,
        "text_tokens": rng.integers(1, vocab, (BATCH, K, L)).astype(np.int32) * mask,
        "text_mask": mask,
    })
  return out


def local_rows(batch, sharding: NamedSharding):
  """This process's rows of a global batch under `sharding` (batch axis split)."""
  idx = sharding.addressable_devices_indices_map((BATCH,))
  rows = sorted({i for sl in idx.values() for i in range(*sl[0].indices(BATCH))})
  assert rows == list(range(rows[0], rows[-1] + 1)), f"non-contiguous local rows {rows}"
  return {k: v[rows[0]:rows[-1] + 1] for k, v in batch.items()}


def initial_params():
  """The run's parameters before any step (same seed, same random init)."""
  from magi_jax.train.trainer import split_model
  c = config(dict(data=1), "blockwise")
  _, params, _ = split_model(c, build.build_model(c, build.tokenizer_for(c)))
  return jax.tree.map(np.asarray, params)


def run(workdir: str, mesh: dict, backend: str, devices=None):
  """-> (losses per step, final params as numpy) of a run on `mesh`."""
  c = config(mesh, backend)
  m = build.mesh(c, devices)
  sharding = NamedSharding(m, build.sharding_rules(c).spec(("batch",)))
  data = iter([local_rows(b, sharding) for b in global_batches(c)])
  res = train(c, workdir, data=data, echo=lambda *a: None, devices=devices)
  history = os.path.join(workdir, "metrics.jsonl")
  losses = ([json.loads(line)["loss"] for line in open(history)] if jax.process_index() == 0
            else None)
  params = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                        res.state.params)
  return losses, params
