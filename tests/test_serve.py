"""The web app for real: `python -m experiments.serve` in a child, driven by headless Chromium.

One server for the module (tiny preset, 24 frames = 3 chunks at 64x64); the page is filled in
and submitted through Playwright with the system Chromium (/usr/bin/chromium: .ci/run installs
Debian's package; Playwright's own browser download is not used). Checked: the video grows in
the page chunk by chunk with each chunk's status and seconds, the finished mp4 downloaded from
the page has the frame plan's frame count, an empty prompt shows its message in the page and
the next request still works, and two requests sent at once (gradio_client) each get their own
file with the right frames, different for different seeds. The form's rules are checked
without a server. The browser tests skip only when there is no Chromium.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from magi_jax.configs import get_preset
from magi_jax.media import plan_frames, read_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
FRAMES, SIZE = 24, 64            # the tiny preset's defaults, given explicitly
RUNTIME = get_preset("tiny").runtime
T2V_FRAMES = plan_frames(FRAMES, 0, RUNTIME.chunk_width, RUNTIME.temporal_downsample_factor)
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run does)")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Served:
  url: str
  log: str
  proc: subprocess.Popen

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory, compile_cache):
  tmp = tmp_path_factory.mktemp("serve")
  log = str(tmp / "server.log")
  env = dict(os.environ, JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="False")
  env.pop("MAGI_VERBOSE", None)
  cmd = [sys.executable, "-m", "experiments.serve", f"--port={_free_port()}",
         f"--config.num_frames={FRAMES}", f"--config.height={SIZE}", f"--config.width={SIZE}",
         f"--config.compile_cache_dir={compile_cache}"]
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
  served = Served("", log, proc)
  deadline = time.monotonic() + 180
  while not served.url:
    found = re.search(r"^serving tiny at (\S+)", served.output(), re.M)
    if found:
      served.url = found.group(1)
    elif proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"the server did not start (exit {proc.poll()}):\n{served.output()[-3000:]}")
    else:
      time.sleep(0.2)
  yield served
  proc.terminate()
  try:
    proc.wait(30)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def browser():
  from playwright.sync_api import sync_playwright
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
    yield b
    b.close()


@pytest.fixture
def page(browser, server):
  context = browser.new_context(accept_downloads=True)
  page = context.new_page()
  page.set_default_timeout(60_000)
  page.goto(server.url, wait_until="networkidle")
  yield page
  context.close()


# Samples, every 10 ms in the page, the status text (each new one) and the player's length in
# seconds (what is buffered, or the file's duration): window.__seen = {statuses, lengths}.
WATCH = """() => {
  window.__seen = {statuses: [], lengths: []};
  window.__watch = setInterval(() => {
    const s = document.querySelector('#status');
    const text = s ? s.innerText.trim() : '';
    const seen = window.__seen.statuses;
    if (text && seen[seen.length - 1] !== text) seen.push(text);
    const v = document.querySelector('#video video');
    let len = 0;
    if (v) {
      if (v.buffered.length) len = v.buffered.end(v.buffered.length - 1);
      if (isFinite(v.duration)) len = Math.max(len, v.duration);
    }
    const lens = window.__seen.lengths;
    if (lens[lens.length - 1] !== len) lens.push(len);
  }, 10);
}"""


def _submit(page, prompt: str, seed: int) -> None:
  page.fill("#prompt textarea", prompt)
  page.fill("#seed input", str(seed))
  page.evaluate(WATCH)
  page.click("#generate")


def _finish(page, tmp_path, name: str) -> tuple[list, list, np.ndarray]:
  """Waits for "done" and the whole video in the player -> (statuses, lengths, frames of the
  downloaded mp4)."""
  page.wait_for_function("() => window.__seen.statuses.some(s => s.includes('· done'))",
                         timeout=120_000)
  seconds = T2V_FRAMES.output_frames / 24
  page.wait_for_function(f"() => Math.abs(window.__seen.lengths.at(-1) - {seconds}) < 0.05",
                         timeout=30_000)
  seen = page.evaluate("() => { clearInterval(window.__watch); return window.__seen; }")
  with page.expect_download() as download:
    page.click("#final a[download]")
  path = str(tmp_path / name)
  download.value.save_as(path)
  return seen["statuses"], seen["lengths"], read_video(path, SIZE, SIZE, max_frames=None)


@needs_chromium
def test_the_page_streams_the_video_and_offers_the_mp4(page, tmp_path):
  _submit(page, "a red ball bounces across a wooden floor", seed=11)
  statuses, lengths, frames = _finish(page, tmp_path, "t2v.mp4")
  assert frames.shape[0] == T2V_FRAMES.output_frames == FRAMES
  n = len(T2V_FRAMES.emitted_chunks)
  done = statuses[-1]
  assert "· done" in done and f"{FRAMES} frames, {SIZE}x{SIZE}, {n} chunks" in done, statuses
  rows = re.findall(r"^(\d+)\s+(\d+)\s+(\d+\.\d+)$", done, re.M)      # the per-chunk table
  assert [int(r[0]) for r in rows] == list(range(1, n + 1)), done
  assert [int(r[1]) for r in rows] == list(T2V_FRAMES.chunk_output_frames), done
  assert all(float(r[2]) > 0 for r in rows), done
  # The page said where it was before the video was done, and the player grew chunk by chunk.
  running = [s for s in statuses[:-1]
             if re.search(rf"chunk [1-{n - 1}]/{n} · \d+ / {FRAMES} frames · [\d.]+ s", s)]
  assert running, statuses
  full = T2V_FRAMES.output_frames / 24
  assert any(0 < x < full - 0.05 for x in lengths), lengths


@needs_chromium
def test_an_empty_prompt_shows_its_message_and_the_server_goes_on(page, tmp_path):
  _submit(page, "", seed=12)
  page.get_by_text("the prompt is empty").first.wait_for(timeout=30_000)
  _submit(page, "a blue cube slides to the left", seed=12)
  statuses, lengths, frames = _finish(page, tmp_path, "after_error.mp4")
  assert frames.shape[0] == T2V_FRAMES.output_frames
  assert "· done" in statuses[-1]
  assert max(lengths) < T2V_FRAMES.output_frames / 24 + 0.05    # this request's video only


def test_two_requests_at_once_get_their_own_videos(server):
  from gradio_client import Client
  client = Client(server.url, verbose=False)
  args = {"mode": "t2v", "prompt": "a green ball", "chunk_prompts": "", "image": None,
          "video": None, "prefix_frames": 32, "height": SIZE, "width": SIZE,
          "num_frames": FRAMES, "num_steps": RUNTIME.num_steps, "guidance": 7.5}
  jobs = [client.submit(*args.values(), seed, api_name="/generate") for seed in (21, 22)]
  with ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda job: job.result(timeout=180), jobs))
  finals = [r[2] for r in results]
  assert len({os.path.basename(f) for f in finals}) == 2, finals      # their own files
  videos = [read_video(f, SIZE, SIZE, max_frames=None) for f in finals]
  assert [v.shape[0] for v in videos] == [T2V_FRAMES.output_frames] * 2
  assert not np.array_equal(videos[0], videos[1])                     # seed 21 vs 22
  assert all("· done" in r[1] for r in results), [r[1] for r in results]
  requests = re.findall(r"^request (\d+): wrote (\S+): (\d+) frames", server.output(), re.M)
  assert len({path for _, path, _ in requests}) == len(requests)       # no path shared


def test_a_bad_upload_is_refused_by_name(server, tmp_path):
  from gradio_client import Client, handle_file
  from gradio_client.exceptions import AppError
  junk = tmp_path / "junk.mp4"
  junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
  client = Client(server.url, verbose=False)
  with pytest.raises(AppError, match="junk.mp4: cannot be decoded as a video"):
    client.predict("v2v", "a cat", "", None, handle_file(str(junk)), 32, SIZE, SIZE,
                   FRAMES, RUNTIME.num_steps, 7.5, 1, api_name="/generate")


# The form's rules, without a server.

def _prepare(tmp_path, **fields):
  from magi_jax.serve import Form, prepare
  return prepare(Form(**fields), RUNTIME, str(tmp_path), "video.mp4")


@pytest.mark.parametrize("fields, message", [
    (dict(prompt="  "), "the prompt is empty"),
    (dict(prompt="a", mode="i2v"), "mode I2V starts from an image: upload one under Image"),
    (dict(prompt="a", mode="v2v"), "mode V2V continues a video"),
    (dict(prompt="a", height=100), "height 100 is not divisible by 16"),
    (dict(prompt="a", height=None), "Height is empty"),
    (dict(prompt="a", num_steps=5), "Steps 5 is not a multiple of 2"),
    (dict(prompt="a", guidance="x"), "Guidance 'x' is not a number"),
    (dict(prompt="a", seed=1.5), "Seed 1.5 is not a whole number"),
    (dict(chunk_prompts="a\nb\nc\nd"), "4 lines, but the video has 3 generated chunks"),
    (dict(chunk_prompts='[{"prompt": "a", "start": 0, "end": 2}]'), "have no prompt"),
    (dict(chunk_prompts="[oops"), "Prompts per chunk: not valid JSON"),
])
def test_a_bad_form_names_its_field(tmp_path, fields, message):
  from magi_jax.errors import MagiError
  with pytest.raises(MagiError, match=re.escape(message)):
    _prepare(tmp_path, **fields)


def test_the_form_becomes_a_request(tmp_path):
  import json
  p = _prepare(tmp_path, chunk_prompts="a red ball\nit bounces", num_steps=4, guidance=3.0,
               seed=7.0)
  assert p.request.prompt == "" and p.request.seed == 7 and p.chunks == 3
  with open(p.request.prompt_file) as f:
    assert json.load(f) == [{"prompt": "a red ball", "start": 0, "end": 1},
                            {"prompt": "it bounces", "start": 1, "end": 3}]
  assert p.runtime["num_steps"] == 4
  assert p.runtime["text_scales"] == tuple(3.0 if s else 0.0 for s in RUNTIME.text_scales)
  png = str(tmp_path / "still.png")
  from PIL import Image
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
  i2v = _prepare(tmp_path, prompt="a", mode="i2v", image=png, video="ignored.mp4")
  assert i2v.request.image == png and i2v.request.video == ""
  assert i2v.plan.output_frames == plan_frames(FRAMES, 1, RUNTIME.chunk_width).output_frames


def test_the_fallback_player_gets_every_frame_so_far(tmp_path):
  from magi_jax.serve.preview import Preview
  preview = Preview(str(tmp_path), 32, 32, streaming=False)
  chunks = [np.full((8, 32, 32, 3), v, np.uint8) for v in (0, 255)]
  paths = [preview.add(c) for c in chunks]
  assert [read_video(p, 32, 32, max_frames=None).shape[0] for p in paths] == [8, 16]
  segments = Preview(str(tmp_path), 32, 32, streaming=True)
  assert read_video(segments.add(chunks[1]), 32, 32, max_frames=None).shape[0] == 8


def test_a_job_holds_the_lock_and_stops_when_nobody_reads():
  import threading
  from magi_jax.serve.job import Cancelled, Job
  lock, running, overlaps, stopped = threading.Lock(), [], [], []

  def work(on_chunk):
    overlaps.append(len(running))
    running.append(1)
    try:
      for i in range(1000):
        on_chunk(i)
        time.sleep(0.001)
      return "done"
    except Cancelled:
      stopped.append(True)
      raise
    finally:
      running.pop()

  jobs = [Job(work, lock) for _ in range(2)]
  first = jobs[0].events()
  assert next(first) == 0
  first.close()                                   # the page went away
  assert list(jobs[1].events())[-1] == "done"     # waited for the lock, then ran to the end
  jobs[0].join(10)
  assert stopped == [True] and overlaps == [0, 0]
