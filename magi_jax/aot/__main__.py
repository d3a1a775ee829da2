r"""python -m magi_jax.aot --job=sample|train|distill --preset=NAME --topology=KIND:AxB[xC] [flags]

Compiles the job's real programs for the TPU slice, ahead of time on this machine, and prints
per-device memory (GiB) and whether the TPU compiler accepts them:

  python -m magi_jax.aot --job=sample --preset=4.5B_distill --height=480 --width=832 \
      --topology=v5e:1x1
  python -m magi_jax.aot --job=train --preset=4.5B_base --height=480 --width=832 --chunks=4 \
      --topology=v5p:2x2x1 --mesh=fsdp:4 --json
  python -m magi_jax.aot --job=train --preset=4.5B_base --height=480 --width=832 --chunks=4 \
      --topology=v5e:2x2 --mesh=fsdp:4 --lora_rank=16 --json      # LoRA fine-tune

--json prints one JSON object per program and line (fields: magi_jax/aot/report.py). Exit
status 0 when every program fits, 1 when the compiler refuses one, 2 for a bad argument
(reported before anything compiles). Needs libtpu: pip install -e ".[aot]".
"""

from __future__ import annotations

import os
import sys

# Compiling for a topology takes no device. libtpu probes the machine it loads on for a TPU
# and its pod's hosts; these keep it from querying a metadata server and warning about it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

from absl import flags  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_enum("job", None, ["sample", "train", "distill"], "what to plan (distill: the "
                  "train step of distilling the --preset base model)", flag_values=FLAGS)
flags.DEFINE_string("preset", None, "MAGI-1 preset: 4.5B_base, 4.5B_distill, 24B_base, ..., tiny",
                    flag_values=FLAGS)
flags.DEFINE_string("topology", None, "TPU slice, libtpu's name: v5e:2x2, v5p:2x2x1, v4:2x2x1, "
                    "v6e:2x2, tpu7x:2x2x1, v5e:1x1 (one chip), v5p:8x8x4 ...", flag_values=FLAGS)
flags.DEFINE_string("mesh", "", "axis sizes, e.g. data:1,fsdp:4,context:1,tensor:1 (missing "
                    "axes 1, one may be -1); default: all devices on fsdp (train) / tensor "
                    "(sample)", flag_values=FLAGS)
flags.DEFINE_integer("height", None, "video height in pixels (default: the preset's)",
                     flag_values=FLAGS)
flags.DEFINE_integer("width", None, "video width in pixels (default: the preset's)",
                     flag_values=FLAGS)
flags.DEFINE_integer("chunks", None, "sample: video length in chunks (default: enough for the "
                     "steady state); train: chunks per packed row (default: the preset's "
                     "num_frames)", flag_values=FLAGS)
flags.DEFINE_integer("tokens", None, "train: tokens per packed row instead of --chunks (and "
                     "of --height/--width when those are not given)", flag_values=FLAGS)
flags.DEFINE_integer("batch", 1, "train: packed rows in the global batch", flag_values=FLAGS)
flags.DEFINE_string("programs", "", "comma-separated subset: sample step,t5,vae; train step",
                    flag_values=FLAGS)
flags.DEFINE_boolean("ema", False, "train: keep an EMA of the parameters", flag_values=FLAGS)
flags.DEFINE_enum("t5_dtype", "float32", ["float32", "bfloat16"], "sample: T5 weights dtype",
                  flag_values=FLAGS)
flags.DEFINE_enum("dit_weights", "bf16", ["bf16", "int8"], "sample: the DiT's weights (int8: "
                  "per-channel weight-only, magi_jax/models/quant.py)", flag_values=FLAGS)
flags.DEFINE_integer("lora_rank", 0, "train / distill: > 0 trains LoRA adapters of this rank "
                     "only (base weights frozen in bf16, AdamW state for the adapters); 0: every "
                     "weight", flag_values=FLAGS)
flags.DEFINE_float("lora_alpha", None, "with --lora_rank: the adapters' alpha (default: the "
                   "rank)", flag_values=FLAGS)
flags.DEFINE_boolean("json", False, "one JSON object per program per line", flag_values=FLAGS)

REQUIRED = ("job", "preset", "topology")


def _parse(argv) -> str | None:
  """Parses argv into FLAGS (from the defaults each time); an error message or None."""
  FLAGS.unparse_flags()
  try:
    rest = FLAGS(list(argv))
  except flags.Error as e:
    return str(e)
  if len(rest) > 1:
    return f"unexpected arguments {rest[1:]}"
  missing = [f"--{n}" for n in REQUIRED if FLAGS[n].value is None]
  if missing:
    return f"missing {', '.join(missing)}"
  return None


def main(argv=None) -> int:
  """The command; returns its exit status (0 all fit, 1 some do not, 2 bad arguments)."""
  argv = sys.argv if argv is None else argv
  if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
    print(__doc__)
    print(FLAGS.get_help())
    return 0
  err = _parse(argv)
  if err is not None:
    print(f"error: {err}\n(python -m magi_jax.aot --help lists the flags)", file=sys.stderr)
    return 2
  from magi_jax.aot import AOTError
  from magi_jax.aot.plan import iter_plan
  from magi_jax.aot.report import table
  request = dict(job=FLAGS.job, preset=FLAGS.preset, topology=FLAGS.topology,
                 mesh=FLAGS.mesh or None, height=FLAGS.height, width=FLAGS.width,
                 chunks=FLAGS.chunks, tokens=FLAGS.tokens, batch=FLAGS.batch,
                 programs=FLAGS.programs or None, ema=FLAGS.ema, t5_dtype=FLAGS.t5_dtype,
                 dit_weights=FLAGS.dit_weights, lora_rank=FLAGS.lora_rank,
                 lora_alpha=FLAGS.lora_alpha)
  echo = lambda s: print(s, file=sys.stderr, flush=True)
  try:
    reports = iter_plan(echo=echo, **request)
  except AOTError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  done = []
  for r in reports:
    done.append(r)
    if FLAGS.json:
      print(r.to_json(), flush=True)       # each line as soon as its program is compiled
  if not FLAGS.json:
    print(table(done))
  return 0 if all(r.fits for r in done) else 1


if __name__ == "__main__":
  sys.exit(main())
