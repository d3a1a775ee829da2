"""launch/colab/sample.ipynb runs top to bottom on CPU with the tiny preset: the runtime is
detected and its memory plan printed (with the compiler's figures) before anything loads.

The code cells are executed in order in one namespace, without the shell / magic lines
(`!pip install ...`: the package is already installed here). After the settings cell the test
sets small values (NUM_FRAMES, NUM_STEPS, PREFIX_FRAMES, OUTPUT_DIR), as the notebook's
settings section documents. Shares the per-session compilation cache of
tests/test_sample_command.py (same shapes: 16 frames, 2 steps, 64x64).
"""

import json
import os

import numpy as np
import pytest

from magi_jax.media import plan_frames, prefix_latent_frames_for_video, read_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab", "sample.ipynb")
FAST = {"NUM_FRAMES": 16, "NUM_STEPS": 2, "PREFIX_FRAMES": 12, "PROGRESS": False}


pytestmark = pytest.mark.usefixtures("compile_cache")


def _load():
  with open(NOTEBOOK) as f:
    return json.load(f)


def _source(cell):
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def _is_shell(line):
  return line.lstrip().startswith(("!", "%"))


def test_notebook_format():
  nb = _load()
  assert nb["nbformat"] == 4
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert kinds[0] == "markdown" and set(kinds) == {"markdown", "code"}
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  for c in code:
    assert c["outputs"] == [] and c["execution_count"] is None, "saved with outputs"
  shell = [i for i, c in enumerate(code) if any(_is_shell(l) for l in _source(c).splitlines())]
  assert shell == [0], "only the install cell may hold shell / magic lines"
  assert "pip install" in _source(code[0])
  settings = [c for c in code if "CHECKPOINT_DIR =" in _source(c)]
  assert len(settings) == 1
  for name in FAST:
    assert f"\n{name} =" in "\n" + _source(settings[0]), f"settings cell lacks {name}"


def test_notebook_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")   # the settings cell's default
  out_dir = tmp_path / "outputs"
  ns = {"__name__": "__main__"}
  code = [c for c in _load()["cells"] if c["cell_type"] == "code"]
  for i, cell in enumerate(code):
    src = "\n".join("" if _is_shell(l) else l for l in _source(cell).splitlines())
    exec(compile(src, f"sample.ipynb code cell {i}", "exec"), ns)
    if "CHECKPOINT_DIR =" in src:                    # the settings cell
      assert ns["CHECKPOINT_DIR"] == ""            # the tiny preset, random weights
      ns.update(FAST, OUTPUT_DIR=str(out_dir))

  nf, chunk_width = FAST["NUM_FRAMES"], 2
  p = prefix_latent_frames_for_video(FAST["PREFIX_FRAMES"])
  expected = {"t2v": plan_frames(nf, 0, chunk_width).output_frames,
              "i2v": plan_frames(nf, 1, chunk_width).output_frames,
              "v2v": plan_frames(nf, p, chunk_width).output_frames}
  assert expected == {"t2v": 16, "i2v": 24, "v2v": 17}
  # The memory plan of the CPU runtime, printed before anything loaded, with the compiler's
  # figures for the steps, the VAE tile and T5.
  printed = capsys.readouterr().out
  plan_text = printed[:printed.index("tiny (random weights)")]
  assert "runtime: CPU" in plan_text and "video: 64x64 (the preset's)" in plan_text
  for program in ("step+refresh", "vae", "t5"):
    assert f"compiler: {program}" in plan_text
  assert plan_text.rstrip().endswith("fits: yes")
  for mode, frames in expected.items():
    res = ns[mode]
    assert res.output == str(out_dir / f"{mode}.mp4")
    assert res.frames == frames
    video = read_video(res.output, 64, 64, max_frames=None)
    assert video.shape == (frames, 64, 64, 3) and video.dtype == np.uint8
  assert os.path.exists(out_dir / "input.png")     # the drawn I2V test image

  html = ns["html"]
  assert html.count("<video") == 3 and "data:video/mp4;base64," in html
  printed += capsys.readouterr().out
  assert f"video: {out_dir / 't2v.mp4'}" in printed  # outside IPython: the paths are printed
