"""python -m magi_jax.official.parity DIR [--only NAMES] [--activations] [--backend NAME]

Reads the official-implementation dumps in DIR (layout: shared/fixtures/README.md), runs the
port on the same inputs and prints one line per check: PASS/FAIL, max abs and max rel error.
Exit status 1 if any check fails. Users with the official code and real weights can dump the
same files from a real run and check the port with this one command.
"""

from __future__ import annotations

import argparse
import os
import sys

from magi_jax.official.parity import dit_forward, dit_sample, text, vae_io
from magi_jax.official.parity.compare import failure

CHECKS = {
    "dit_forward": (dit_forward.FILE, dit_forward.run),
    "dit_sample_cfg3": ("dit_sample_cfg3.safetensors", dit_sample.run_cfg3),
    "dit_sample_cfg1": ("dit_sample_cfg1.safetensors", dit_sample.run_cfg1),
    "vae_io": (vae_io.FILE, vae_io.run),
    "text": (text.FILE, text.run),
}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m magi_jax.official.parity",
                               description=__doc__.split("\n\n")[1])
  ap.add_argument("directory", help="fixture directory (e.g. tests/fixtures)")
  ap.add_argument("--only", default="",
                  help=f"comma-separated checks; available: {', '.join(CHECKS)}")
  ap.add_argument("--activations", action="store_true",
                  help="also compare the intermediate activations / every sampler call "
                       "(to localise an error)")
  ap.add_argument("--backend", default="reference", help="attention backend to run the port with")
  args = ap.parse_args(argv)

  if not os.path.isdir(args.directory):
    print(f"error: {args.directory} is not a directory", file=sys.stderr)
    return 2
  names = [n for n in args.only.split(",") if n] or list(CHECKS)
  unknown = [n for n in names if n not in CHECKS]
  if unknown:
    print(f"error: unknown check(s) {', '.join(unknown)}; available: {', '.join(CHECKS)}",
          file=sys.stderr)
    return 2
  explicit = bool(args.only)
  results = []
  for name in names:
    file, fn = CHECKS[name]
    if not os.path.exists(os.path.join(args.directory, file)):
      if explicit:
        results.append(failure(name, f"{file} not found in {args.directory}"))
      else:
        print(f"SKIP  {name:<48s} ({file} not in {args.directory})")
      continue
    try:
      results.extend(fn(args.directory, activations=args.activations, backend=args.backend))
    except Exception as e:  # a crash is a failed check, reported like one
      results.append(failure(name, f"{type(e).__name__}: {e}"))
  for r in results:
    print(r.line())
  if not results:
    print("no checks ran", file=sys.stderr)
    return 1
  failed = sum(not r.ok for r in results)
  print(f"{len(results) - failed} passed, {failed} failed")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
