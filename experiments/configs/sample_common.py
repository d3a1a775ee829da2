"""Fields shared by every sampling config (`python -m experiments.sample --config=...`).

Not a config file itself: the preset files call `sample_config(preset, **overrides)`.
Every field can be overridden on the command line, e.g. `--config.prompt="a red fox"`.
"""

import ml_collections


def sample_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = preset               # magi_jax.configs preset (model / runtime / engine settings)
  c.magi_config = ""              # optional official *_config.json instead of the preset
  # A training run directory (runs/NAME, what experiments.train writes) to sample: its DiT,
  # text encoder or T5, VAE (or pixel space), video size and sampler settings
  # (magi_jax/generate/trained.py). Or a Hugging Face repository id, owner/name[@revision]
  # (sand-ai/MAGI-1): the preset's DiT, VAE and T5 from it (magi_jax/convert/hub.py), for the
  # weight fields below that are left empty.
  c.checkpoint = ""
  c.step = 0                      # the run's checkpoint step (0: the latest)
  c.use_ema = True                # the run's EMA weights when it kept them (False: raw)
  c.lora = ""                     # a LoRA adapter file (lora.safetensors) merged into the DiT
  c.lora_scale = 1.0              # times the adapters' trained update
  # Weights: converted orbax or official directories. Empty = random (tiny preset only).
  c.dit_checkpoint = ""
  c.vae_checkpoint = ""
  c.t5_checkpoint = ""
  c.special_tokens = ""           # special_tokens.npz (empty: random for tiny, else required)
  c.special_token_flags = "hq,duration"   # official run.sh: PAD_HQ=1 PAD_DURATION=1
  c.neg_prompt = False            # official NEG_PROMPT
  c.text_cache_dir = "~/.cache/magi_jax/text"   # on-disk T5 embedding cache ("" = off)
  # Where and how T5 runs (a memory plan sets these: magi_jax/device_plan): its weights'
  # dtype (float32 as MAGI-1; bfloat16 halves them), its device ("" the accelerator, "cpu"
  # the host, the official t5_device), and text_first: encode the prompts, then free T5
  # before the DiT loads (the components then serve only those prompts).
  c.t5_dtype = "float32"
  c.t5_device = ""
  c.text_first = False
  c.compile_cache_dir = "~/.cache/magi_jax/jax_compile"   # persistent JAX compilation cache:
                                  # a second run loads its programs ("" = JAX's own setting)
  c.compile_ahead = True          # compile the request's sampler steps in the background
                                  # while the text encoder and the VAE load
  c.dit_weights = "bf16"          # bf16 | int8 (weight-only per-channel int8 layer kernels,
                                  # magi_jax/models/quant.py: half the memory, approximate)
  c.precision = "bf16"            # bf16 (the official policy) | fp32
  c.backend = "auto"              # attention backend (auto: by platform and mesh)
  # What to generate.
  c.mode = "t2v"                  # t2v | i2v | v2v
  c.prompt = "A red ball bounces across a wooden floor."
  c.prompt_file = ""              # per-chunk prompts (JSON list of {prompt, start, end})
  c.image = ""                    # i2v input image
  c.video = ""                    # v2v prefix video
  c.prefix_frames = 32            # v2v: frames of the video used as prefix (official: 32)
  c.height = 0                    # 0 = the preset's video_size_h
  c.width = 0
  c.num_frames = 0                # 0 = the preset's num_frames
  c.num_steps = 0                 # 0 = the preset's num_steps
  c.shortcut_mode = ""            # "" = preset; 12-step grid "8,16,16" | "16,16,8"
  c.text_scales = ()              # () = preset (per cfg_t_range bucket)
  c.prev_chunk_scales = ()
  c.nearly_clean_weight = 0.7     # official env prev_chunks_scale (distilled models)
  c.seed = 1234
  c.output = "sample.mp4"         # .mp4 (H.264 yuv420p) or .gif
  c.progress = True
  c.update(overrides)
  return c
