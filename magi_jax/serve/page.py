"""The Gradio page over a `Server`: `build_page(server)` -> a queued `gr.Blocks`.

Left: prompt, prompts per chunk, mode with its upload, height / width / frames, steps, guidance,
seed, Generate. Right: the video growing chunk by chunk while it is generated (a streaming
player, or after each chunk an mp4 of every frame so far: magi_jax/serve/preview.py), the status
line (chunk k/n, each chunk's seconds) and the finished mp4 to download. A bad field shows its
message in the page (`gr.Error`) and the server goes on serving. Requests queue one at a time
(`default_concurrency_limit=1`; the server's lock holds whatever the queue does). The click is
also the API endpoint `/generate` (gradio_client), with the inputs in the order of `INPUTS`.
"""

from __future__ import annotations

import os

from magi_jax.cli import one_line
from magi_jax.errors import MagiError
from magi_jax.serve.errors import ServeError
from magi_jax.serve.form import Form
from magi_jax.serve.server import Server

# The API's inputs, in order (the Form fields).
INPUTS = ("mode", "prompt", "chunk_prompts", "image", "video", "prefix_frames", "height",
          "width", "num_frames", "num_steps", "guidance", "seed")
MODE_CHOICES = [("T2V: text to video", "t2v"), ("I2V: from an image", "i2v"),
                ("V2V: continue a video", "v2v")]
CHUNK_PROMPTS_HELP = ('One prompt per generated chunk, one per line (the last line holds for '
                      'the chunks after it), or a prompt-file JSON list of {"prompt": ..., '
                      '"start": chunk, "end": chunk}. When filled, it replaces the prompt.')


def gradio():
  """The gradio module, or a ServeError saying how to install it."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  try:
    import gradio as gr
  except ImportError as e:
    raise ServeError(f"the web app needs gradio ({e}); install it with "
                     "pip install -e '.[serve]'") from None
  return gr


def build_page(server: Server):
  """The page (queued: one generation at a time)."""
  gr = gradio()
  d = server.defaults

  def run(*values):
    form = Form(**dict(zip(INPUTS, values)))
    try:
      yield gr.skip() if server.streaming else None, "", None     # a new request: clear
      for update in server.run(form):
        yield (update.video or gr.skip(), update.status, update.final or gr.skip())
    except MagiError as e:
      raise gr.Error(one_line(e), print_exception=False) from None

  def show_uploads(mode):
    return gr.update(visible=mode == "i2v"), gr.update(visible=mode == "v2v")

  with gr.Blocks(title="MAGI-1", analytics_enabled=False) as page:
    gr.Markdown(f"## MAGI-1 · {server.preset or 'sampling'}\nThe video grows one chunk at a "
                "time while it is generated; the finished mp4 is offered below it.")
    with gr.Row():
      with gr.Column():
        prompt = gr.Textbox(d.prompt, label="Prompt", lines=3, elem_id="prompt")
        with gr.Accordion("Prompts per chunk", open=bool(d.chunk_prompts)):
          chunk_prompts = gr.Textbox(d.chunk_prompts, label="Prompts per chunk", lines=4,
                                     info=CHUNK_PROMPTS_HELP, elem_id="chunk_prompts")
        mode = gr.Radio(MODE_CHOICES, value=d.mode, label="Mode", elem_id="mode")
        image = gr.Image(d.image, type="filepath", format="png", sources=["upload"],
                         label="Image (I2V)", visible=d.mode == "i2v", elem_id="image")
        with gr.Group(visible=d.mode == "v2v") as v2v:
          video_in = gr.Video(d.video, sources=["upload"], label="Video (V2V prefix)",
                              elem_id="video_in")
          prefix_frames = gr.Number(d.prefix_frames, precision=0, label="Prefix frames",
                                    info="the video's first frames that are the prefix",
                                    elem_id="prefix_frames")
        with gr.Row():
          height = gr.Number(d.height, precision=0, label="Height", elem_id="height")
          width = gr.Number(d.width, precision=0, label="Width", elem_id="width")
          num_frames = gr.Number(d.num_frames, precision=0, label="Frames",
                                 elem_id="num_frames")
        with gr.Row():
          steps = gr.Number(d.num_steps, precision=0, label="Steps", elem_id="steps")
          guidance = gr.Number(d.guidance, label="Guidance (text scale)", elem_id="guidance")
          seed = gr.Number(d.seed, precision=0, label="Seed", elem_id="seed")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
      with gr.Column():
        video = gr.Video(label="Video (grows chunk by chunk)", streaming=server.streaming,
                         autoplay=True, interactive=False, elem_id="video")
        status = gr.Markdown("", elem_id="status")
        final = gr.File(label="Finished video", interactive=False, elem_id="final")
    mode.change(show_uploads, mode, [image, v2v], queue=False,
                api_visibility="private")
    inputs = [mode, prompt, chunk_prompts, image, video_in, prefix_frames, height, width,
              num_frames, steps, guidance, seed]
    button.click(run, inputs, [video, status, final], api_name="generate",
                 show_progress="minimal")
  page.queue(default_concurrency_limit=1)
  return page
