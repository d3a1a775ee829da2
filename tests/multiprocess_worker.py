"""One process of a multi-process CPU run: `python tests/multiprocess_worker.py MODE`.

Started by tests/test_distributed.py, once per process, with MAGI_COORDINATOR_ADDRESS,
MAGI_NUM_PROCESSES, MAGI_PROCESS_ID, JAX_PLATFORMS=cpu and
XLA_FLAGS=--xla_force_host_platform_device_count=N in its environment. It starts JAX through
`magi_jax.parallel.distributed.initialize`, runs MODE and prints one line
`RESULT <json>` that the test compares across processes.

Modes (add one by writing a function `mode_<name>(info) -> dict` and listing it in MODES):
  global_sum: a 1-D mesh over every global device, an array sharded over it built from
    each process's rows (`jax.make_array_from_process_local_data`), its jitted sum.
  train: 3 demo train steps on an 8-device fsdp x context x tensor mesh (ring attention);
    losses and per-parameter sums / norms.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from magi_jax.parallel import distributed  # noqa: E402


def mode_global_sum(info):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  n = jax.device_count()
  rows_per_device = 3
  global_rows = np.arange(n * rows_per_device * 2, dtype=np.float32).reshape(-1, 2)
  # This process's rows: the devices of a 1-D mesh over jax.devices() are grouped by process.
  per_process = len(global_rows) // jax.process_count()
  start = jax.process_index() * per_process
  local = global_rows[start:start + per_process]
  x = jax.make_array_from_process_local_data(sharding, local, global_rows.shape)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  # A second reduction through an explicit cross-device collective.
  col = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, P()))(x)
  return {
      "sum": float(np.asarray(total)),
      "expected_sum": float(global_rows.sum()),
      "column_sums": np.asarray(col).tolist(),
      "global_shape": list(x.shape),
      "addressable_shards": len(x.addressable_shards),
  }


def mode_train(info):
  """3 demo train steps on a fsdp 2 x context 2 x tensor 2 mesh with ring attention
  (tests/mesh_train_case.py); the workdir comes from MAGI_TEST_WORKDIR (shared by the
  processes of one run, as orbax wants)."""
  import numpy as np
  import jax
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import mesh_train_case
  losses, params = mesh_train_case.run(os.environ["MAGI_TEST_WORKDIR"],
                                       dict(data=1, fsdp=2, context=2, tensor=2), "ring")
  leaves = jax.tree.leaves(params)
  return {"losses": losses, "param_sums": [float(np.sum(x, dtype=np.float64)) for x in leaves],
          "param_norms": [float(np.linalg.norm(x.astype(np.float64))) for x in leaves]}


MODES = {"global_sum": mode_global_sum, "train": mode_train}


def main(argv):
  if len(argv) != 2 or argv[1] not in MODES:
    raise SystemExit(f"usage: {argv[0]} MODE  (MODE: {', '.join(MODES)})")
  info = distributed.initialize()
  out = dict(info, mode=argv[1], **MODES[argv[1]](info))
  print("RESULT " + json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
  main(sys.argv)
