"""Serve sampling as a web page: `python -m experiments.serve [--config=<sampling config>]`.

Loads the sampling config's components once (default experiments/configs/tiny.py: random
weights, CPU; every `--config.<field>` of `python -m experiments.sample` works, e.g.
`--config=experiments/configs/magi.py:4.5B_distill --config.checkpoint=sand-ai/MAGI-1`), then
prints `serving tiny at http://127.0.0.1:7860 (requests write under /tmp/magi_serve_...;
Ctrl-C stops)` and serves until stopped. `--host` (default 127.0.0.1), `--port` (default 7860)
and `--share` (a public gradio.live link) say where.

The page takes a prompt (or prompts per chunk), T2V / I2V / V2V with an image or video upload,
height, width, frames, steps, guidance and seed; the video grows in the page chunk by chunk,
with each chunk's time, and the finished mp4 is offered for download (magi_jax/serve/).
Expected result with the tiny preset on a 2-core CPU: the server is up in about 7 s; a request
gives 24 frames, 64x64, in 3 chunks; the first one compiles (measured 7.4 / 3.7 / 6.8 s for its
chunks, 20 s in all, with an empty compile cache), later ones take under 0.1 s per chunk.
"""

from __future__ import annotations

import logging

from absl import app, flags

from magi_jax import cli
from magi_jax.errors import MagiError

_CONFIG = cli.config_file_flag("config", "experiments/configs/tiny.py",
                                          "sampling config file")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every "
                            "interface)")
_PORT = flags.DEFINE_integer("port", 7860, "TCP port to listen on")
_SHARE = flags.DEFINE_bool("share", False, "also serve through a public gradio.live link")


def main(argv):
  del argv
  from magi_jax import compile_cache
  from magi_jax.serve.listen import check_listen
  from magi_jax.serve.page import build_page, gradio
  from magi_jax.serve.server import check_servable, load_server

  logging.getLogger("httpx").setLevel(logging.WARNING)    # gradio's own start-up requests
  c = _CONFIG.value
  try:
    check_servable(c)
    check_listen(_HOST.value, _PORT.value)
    gradio()
    compile_cache.enable(c.compile_cache_dir)
    server = load_server(c)
    page = build_page(server)
  except MagiError as e:           # bad input: a usage error, not a traceback
    raise app.UsageError(str(e)) from None
  try:
    page.launch(server_name=_HOST.value, server_port=_PORT.value, share=_SHARE.value,
                prevent_thread_lock=True, quiet=True, show_error=True,
                allowed_paths=[server.root])
  except OSError as e:             # the port was taken while the model loaded
    raise app.UsageError(f"--port={_PORT.value}: cannot listen on {_HOST.value}:"
                         f"{_PORT.value} ({cli.one_line(e)}); pick another with --port=N") from None
  print(f"serving {c.preset} at {page.local_url} (requests write under {server.root}; "
        "Ctrl-C stops)", flush=True)
  if not server.streaming:        # say which player the page has, not only in the page
    print("no ffmpeg / ffprobe on PATH: the page shows the video so far after each chunk "
          "instead of streaming it (install ffmpeg for the streaming player)", flush=True)
  if page.share_url:
    print(f"public link: {page.share_url}", flush=True)
  page.block_thread()


if __name__ == "__main__":
  cli.run(main)
