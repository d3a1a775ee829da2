"""Smoke test of benchmarks/context_memory.py: the helpers, its FLOP accounting run as a
command (ring attention on 4 fake CPU devices; about 15 s on a 2-core CPU), and its attention
memory part at a tiny size on a 4-chip TPU topology (compiled by libtpu on this host; about a
minute on a 2-core CPU, skipped without libtpu)."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "context_memory.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import context_memory as cm  # noqa: E402


def run_script(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


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
  out = run_script("--parts=flops", "--flop_chunk_tokens=64")
  lines = {ln.split("  ")[0].strip(): ln for ln in out.splitlines()}
  for label in ("forward", "backward", "forward + backward"):
    ratio = float(lines[label].split()[-1].rstrip("x"))
    assert 0.5 < ratio <= 0.6, (label, out)
  assert "'zigzag'): visible chunk pairs per device [9, 9, 9, 9], max/min 1.00" in out


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason='libtpu is not installed (pip install -e ".[aot]"): the attention '
                    "part compiles for a TPU topology through it")
def test_attention_memory_falls_as_one_over_n():
  # 2K tokens on v5e:2x2 (4 chips): context 2 x fsdp 2, then context 4 x fsdp 1; 128-token
  # tiles keep the two TPU compiles short.
  out = run_script("--parts=attention", "--topology=v5e:2x2", "--contexts=2K",
                   "--cp_sizes=2,4", "--layouts=zigzag", "--block=128")
  row = next(ln for ln in out.splitlines() if ln.split()[:1] == ["2K"])
  n2, r2, n4, r4 = row.split()[1:]
  assert r2 == "1.000x", out
  assert 0 < float(n4) < float(n2), out
  assert float(r4.rstrip("x")) < 0.75, out
  assert re.search(r"ideal\s+1\.000x\s+0\.500x", out), out
