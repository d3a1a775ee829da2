"""Entry points speak in one line (magi_jax/cli.py): a bad flag, config field, config file or
variant, and a run's typed error, each give one line on stderr and a non-zero exit; a
traceback only with --verbose."""

import os
import subprocess
import sys

import pytest

from magi_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("MAGI_VERBOSE", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


def _error_lines(proc):
  return [line for line in proc.stderr.splitlines() if line.startswith("error: ")
          or line.startswith("checkpoint error: ") or "Traceback" in line]


@pytest.mark.parametrize("argv, code, says", [
    (["--config.total_step=1"], 2,
     "unknown config field 'total_step'; Did you mean \"total_steps\" instead of \"total_step\"?"),
    (["--config=experiments/configs/missing.py"], 2,
     "config file: [Errno 2] No such file or directory: 'experiments/configs/missing.py'"),
    (["--config=experiments/configs/bouncing_tiny.py:nope"], 2,
     "unknown config variant 'nope'; use ':smoke' or nothing"),
    (["--config.total_steps=abc"], 2, "--config.total_steps=abc: invalid literal for int()"),
    (["--no_such_flag=3"], 2, "Unknown command line flag 'no_such_flag'"),
], ids=["unknown_field", "missing_file", "bad_variant", "bad_value", "unknown_flag"])
def test_train_refuses_bad_flags_in_one_line(argv, code, says, tmp_path):
  proc = _run("experiments.train", *argv, f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == code, proc.stderr[-2000:]
  lines = _error_lines(proc)
  assert len(lines) == 1 and lines[0].startswith("error: bad flag or config file: "), lines
  assert says in lines[0], lines[0]
  assert not os.path.exists(tmp_path / "w")                 # nothing was started


def test_a_run_error_is_one_line_and_verbose_keeps_the_traceback(tmp_path):
  proc = _run("experiments.evaluate", f"--workdir={tmp_path}")
  assert proc.returncode == 1
  lines = _error_lines(proc)
  assert len(lines) == 1 and lines[0].startswith("checkpoint error: "), lines
  assert "no run description" in lines[0]
  proc = _run("experiments.train", "--config.total_step=1", "--verbose")
  assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr


def test_one_line_unquotes_and_joins():
  assert cli.one_line(KeyError("'x'\nDid you mean \"y\"?")) == "'x'; Did you mean \"y\"?"
  assert cli.one_line(AttributeError(KeyError("k"))) == "k"
  wrapped = ValueError("Error whilst parsing:\nTraceback (most recent call last):\n  File x\n"
                       "ValueError: bad variant")
  assert cli.one_line(wrapped) == "ValueError: bad variant"
