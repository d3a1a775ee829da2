"""docs/finetune.md's rehearsal, run as written: generated clips -> random official weights ->
experiments.prepare -> LoRA training on the shards -> a sampled video, each a real command in
its own process. The block is read from the document, so the document cannot drift from what
works. Also the launchers' offline-encoding mode (dry run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "finetune.md")
MARK = "<!-- rehearsal: tests/test_finetune_recipe.py runs the next block as it is -->"


def rehearsal_block() -> str:
  with open(DOC, encoding="utf-8") as f:
    text = f.read()
  assert MARK in text, f"{DOC} lost its rehearsal marker"
  m = re.match(r"\s*```bash\n(.*?)```", text.split(MARK, 1)[1], re.S)
  assert m, "the rehearsal marker must be followed by a ```bash block"
  return m.group(1)


def test_the_documented_rehearsal_runs_end_to_end(tmp_path):
  block = rehearsal_block()
  for command in ("experiments.prepare", "experiments.train", "experiments.sample",
                  "experiments.random_official", "magi_jax.proj.bouncing.clips"):
    assert command in block
  env = dict(os.environ, WORK=str(tmp_path), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  res = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  out = res.stdout + res.stderr
  assert res.returncode == 0, out[-4000:]
  assert "wrote 6 clips" in out and "6 clips (12 chunks) from 6 videos" in out, out[-3000:]
  assert "step 4/4" in out and "wrote LoRA adapters" in out, out[-3000:]
  assert re.search(r"lora\.mp4: 16 frames, 32x32, 2 chunks", out), out[-3000:]
  with open(tmp_path / "prepared" / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["totals"]["clips"] == 6 and not manifest["skipped"]
  assert (tmp_path / "runs" / "lora" / "lora.safetensors").stat().st_size > 0
  from magi_jax.media.read import read_video
  video = read_video(str(tmp_path / "lora.mp4"), 32, 32, fps=8, max_frames=None)  # sample.fps
  assert video.shape == (16, 32, 32, 3) and np.ptp(video) > 0


def test_the_pod_launcher_starts_prepare_on_every_worker():
  res = subprocess.run(["bash", "launch/tpu_pod.sh", "-n", "-t", "pod", "-z", "zone", "-m",
                        "experiments.prepare", "-c", "experiments/configs/finetune_lora.py",
                        "--", "--out=gs://bucket/prepared"], cwd=ROOT, capture_output=True,
                       text=True)
  assert res.returncode == 0, res.stderr
  assert "--worker=all" in res.stdout
  assert ("-m experiments.prepare --config=experiments/configs/finetune_lora.py "
          "--distributed=on --out=gs://bucket/prepared") in res.stdout
  assert "--workdir" not in res.stdout
  bad = subprocess.run(["bash", "launch/tpu_pod.sh", "-n", "-t", "pod", "-z", "zone", "-m",
                        "experiments.nope"], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and "MODULE (-m) must be" in bad.stderr
