"""Smoke test of benchmarks/context_memory.py: the helpers, and its FLOP accounting run as a
command (ring attention on 4 fake devices; about 15 s on a 2-core CPU)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "context_memory.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import context_memory as cm  # noqa: E402


def test_token_helpers():
  assert cm.parse_tokens("64K") == 65536 and cm.parse_tokens("4M") == 4 * 2 ** 20
  assert cm.fmt_tokens(2 ** 20) == "1M" and cm.fmt_tokens(3000) == "3000"
  with pytest.raises(ValueError):
    cm.parse_tokens("4G")
  # 4M tokens: 8192-token chunks, 512 = 2 x 256 of them; 64K over 256 devices: 128 tokens.
  assert cm.chunk_tokens(4 * 2 ** 20, 256, 8192) == 8192
  assert cm.chunk_tokens(65536, 256, 8192) == 128
  assert cm.chunk_tokens(65536, 8, 8192) == 4096


def test_flop_accounting_command():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, SCRIPT, "--parts=flops", "--flop_chunk_tokens=64"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = {ln.split("  ")[0].strip(): ln for ln in proc.stdout.splitlines()}
  for label in ("forward", "backward", "forward + backward"):
    ratio = float(lines[label].split()[-1].rstrip("x"))
    assert 0.5 < ratio <= 0.6, (label, proc.stdout)
  assert "'zigzag'): visible chunk pairs per device [9, 9, 9, 9], max/min 1.00" in proc.stdout
