"""Defaults shared by the training configs; each config file overrides what it changes.

Every field is documented here once. Override any of them on the command line, e.g.
`--config.total_steps=100 --config.optim.lr=3e-4`.
"""

import os

import ml_collections


def train_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 50                 # metrics interval (TensorBoard, log line with ETA)
  c.checkpoint_every = 500         # async orbax saves; also at the end and on SIGTERM
  c.keep_checkpoints = 3
  c.resume = "same"                # resume a workdir only with its run's config; "changed":
                                   # also with other fields (printed; magi_jax/train/resume.py)
  # Synchronous saves: a crash loses at most checkpoint_every steps. Asynchronous ones write
  # while training goes on (faster for large states) and a crash may lose up to twice that.
  c.async_checkpoints = False
  c.max_consecutive_nans = 10      # non-finite steps in a row before the run stops
  c.tensorboard = True
  c.sample_every = 0               # sample videos + frame strip every N steps (0: end only)
  c.sample_at_end = True
  c.ema_decay = 0.0                # 0 disables the EMA of the parameters
  c.compile_cache_dir = "~/.cache/magi_jax/jax_compile"   # persistent JAX compilation cache:
                                   # a rerun loads its programs ("" = JAX's own setting)

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"          # magi_jax.configs preset the architecture starts from
  c.model.overrides = ml_collections.ConfigDict()   # ModelConfig fields to change
  c.model.precision = "fp32"       # fp32 | bf16 (bf16 compute, fp32 master weights)
  c.model.remat = False            # recompute layer activations in the backward pass
  c.model.remat_policy = "nothing_saveable"   # under remat: a jax.checkpoint_policies name
                                   # (magi_jax.models.stack.REMAT_POLICIES); nothing_saveable
                                   # recomputes each whole layer, dots_saveable keeps matmuls
  c.model.scan_layers = True       # layers run by a scan over stacked weights (fast compile);
                                   # False unrolls them (same values)
  c.model.prediction = "velocity"  # velocity (official) | clean (see magi_jax/diffusion/flow.py)
  c.model.backend = "auto"         # attention backend: auto (by platform and mesh) | flash |
                                   # reference | dot_product | splash (TPU); ring | ulysses
                                   # split the sequence over mesh.context

  # The device mesh (magi_jax/parallel/mesh.py). -1 takes the devices the others leave; the
  # global batch (data.batch_size) must divide by data x fsdp. dcn_data > 1: multi-slice.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1, dcn_data=1))
  # Logical-axis rules (name -> mesh axes) and parameter-path rules (regex -> logical names
  # per dim, or None: replicated on purpose); the defaults live in magi_jax/parallel/rules.py.
  # Set either to a list of pairs. A weight of rank >= 2 no rule matches is replicated with a
  # warning; strict=True makes it an error.
  c.sharding = ml_collections.ConfigDict(dict(logical=(), params=(), strict=False))

  c.init = ml_collections.ConfigDict()
  c.init.kind = "random"           # random | official (official DiT dir) | converted (orbax) |
                                   # run: a previous training run's workdir (the next stage)
  c.init.path = ""
  # init.kind=run (magi_jax/train/stages.py): the DiT (and a trained text encoder both runs
  # have) of init.path's latest checkpoint start this run; optimizer, step and schedule start
  # afresh. Its architecture must be this config's. A workdir with checkpoints resumes them
  # instead. A previous LoRA run is merged; a LoRA run over a run re-reads that run as its
  # base at every start; LoRA on both sides is refused.
  c.init.use_ema = True            # run: the run's EMA weights when it kept an EMA, else raw

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0                  # > 0: train only LoRA adapters on the DiT
  c.lora.alpha = 8.0
  c.lora.targets = ("q", "k", "v", "qx", "kx", "vx", "proj", "fc1", "fc2")
  c.lora.export_merged = False     # also write base + adapters merged, official layout

  c.text = ml_collections.ConfigDict()
  c.text.kind = "demo"             # precomputed (T5 rows in the data) | a text encoder of
                                   # config.project trained with the DiT (demo: word encoder)
  c.text.width = 64
  c.text.layers = 1
  c.text.heads = 2
  c.text.max_length = 16
  c.text.t5_path = ""              # precomputed: the T5 checkpoint that encodes the captions
  # precomputed: the official special_tokens.npz; its tokens go before every noisy chunk's T5
  # rows as sampling puts them ([DURATION_k, HQ, t5 ...] for "hq,duration", k = chunks left in
  # the video, at most 8), so a fine-tuned official model sees the captions it will be sampled
  # with. "" adds none (the rows as T5 made them).
  c.text.special_tokens = ""
  c.text.special_token_flags = "hq,duration"   # the official run.sh's PAD_HQ=1 PAD_DURATION=1

  # The project that adds data sources, trained text encoders and evaluators by name
  # (magi_jax/train/project.py); the default is the bouncing-shapes demo.
  c.project = "magi_jax.proj.bouncing.training"
  c.evals = ("samples",)           # evaluators of the project, run at sample_every and at the end

  c.data = ml_collections.ConfigDict()
  c.data.kind = "bouncing"         # video_folder | prepared | a data source of config.project
                                   # (bouncing)
  c.data.data_dir = ""             # TFDS data_dir ("" = <workdir>/tfds)
  c.data.world = ml_collections.ConfigDict()  # magi_jax.proj.bouncing.world.WorldConfig fields
  c.data.train_episodes = 256
  c.data.test_episodes = 64
  c.data.video_dir = ""            # video_folder: folder of mp4 files + captions.json
  c.data.prepared_dir = ""         # prepared: latents + T5 rows of video_dir, written by
                                   # python -m experiments.prepare (docs/finetune.md)
  c.data.buckets = ()              # prepare: aspect-ratio buckets ((h, w), ...); each video is
                                   # stretched to the one nearest its aspect ratio
                                   # (() = data.height x data.width only)
  c.data.image_ratio = 0.0         # image steps per video step (the report's mix: 4.0)
  c.data.val_fraction = 0.0        # prepare: share of videos held out (by name hash) for validation
  c.data.clip_frames = 96
  c.data.stride = 96
  c.data.height = 256
  c.data.width = 256
  c.data.frames_per_chunk = 24     # video_folder: frames per chunk (MAGI-1: 24 = 1 s)
  c.data.batch_size = 8            # the global batch (rows); each process loads its share
  c.data.bin_chunks = 4            # chunks per packed training row
  c.data.pack_window = 32          # examples per first-fit-decreasing packing window
  c.data.shuffle_seed = 0
  c.data.min_chunks = 1            # random sub-clips of min..max chunks (packing variety)

  c.vae = ml_collections.ConfigDict()
  c.vae.kind = "none"              # none (pixel space) | official | converted | random_tiny
  c.vae.path = ""
  c.vae.precision = "fp32"
  c.vae.scale_factor = 0.18215     # official runtime_config.scale_factor

  c.objective = ml_collections.ConfigDict()
  c.objective.chunk_width = 4      # latent frames per chunk (pixel space: frames)
  c.objective.p_v2v = 0.3
  c.objective.p_i2v = 0.2
  c.objective.clean_t_min = 0.95
  c.objective.text_dropout = 0.1
  c.objective.t_mean = 0.0
  c.objective.t_std = 0.5
  c.objective.t_shift = 1.0 / 3.0
  c.objective.levels = "sorted"    # or "staggered" (window states; ignores t_mean / t_std)
  c.objective.stagger = 0.5        # "staggered": grid units between noisy chunks (1 / window)
  # Share of V2V videos whose clean chunks the loss pass sees as the model's own estimate
  # (magi_jax/train/own_context.py; one extra forward pass per step), at a level per video
  # drawn from U[own_context_t], from step own_context_from on; 0 = off.
  c.objective.own_context = 0.0
  c.objective.own_context_t = (0.2, 0.5)
  c.objective.own_context_from = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1000
  c.optim.schedule = "constant"    # constant | cosine | linear (decay to end_lr)
  c.optim.end_lr = 1e-5
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.optim.grad_clip = 1.0

  # Shortcut + guidance distillation (magi_jax/train/distill.py): a teacher makes this run a
  # distillation run; the student is a distilled DiT of the teacher's architecture.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""           # "" (not distilling) | a base run's workdir | init (the init
                                   # weights, e.g. an official base checkpoint)
  c.distill.cycle = (1 / 64,) * 8 + (1 / 32, 1 / 16, 1 / 8)   # step size of step i: cycle[i % n]
  # The teacher's guidance (MAGI's three passes), by the sampler's rule: a chunk at level t
  # takes bucket #{cfg_t_range < t} - 1; v2v_text_scales (empty: text_scales) for videos with
  # clean chunks.
  c.distill.cfg_t_range = (0.0,)
  c.distill.prev_chunk_scales = (1.0,)
  c.distill.text_scales = (3.0,)
  c.distill.v2v_text_scales = ()
  c.distill.export_official = False   # also write the student (LoRA merged) in the official
                                      # layout, <workdir>/distilled_dit/, at the end of the run

  # Validation loss per noise-level bucket on the held-out split (data.val_fraction), every N
  # steps (0: never), over `batches` batches drawn the same way every time.
  c.validation = ml_collections.ConfigDict(dict(every=0, batches=4))

  c.sample = ml_collections.ConfigDict()
  c.sample.num_videos = 4
  c.sample.num_steps = 16
  c.sample.window_size = 2
  c.sample.text_scale = 3.0         # classifier-free guidance of caption-only (T2V) samples
  c.sample.v2v_text_scale = 1.0     # ... and of continuations (1 = no text guidance)
  c.sample.prev_scale = 1.0
  c.sample.kv_chunks = 0            # chunks each chunk attends to, itself included (0 = all)
  c.sample.prefix_chunks = 1
  c.sample.fps = 8
  c.sample.formats = ("mp4", "gif")
  return c


def official_video_finetune():
  """`train_config()` for fine-tuning the official 4.5B base weights on a video folder: bf16,
  remat, T5 rows stored with the clips, 480x832 clips of 4 chunks encoded by the official VAE
  inside the step (the LoRA and distillation fine-tunes start here)."""
  c = train_config()
  c.model.preset = "4.5B_base"
  c.model.precision = "bf16"
  c.model.remat = True
  c.init.kind = "official"
  c.text.kind = "precomputed"
  c.text.max_length = 800          # the 4.5B / 24B DiT's caption rows (caption_max_length)
  c.data.kind = "video_folder"
  c.project, c.evals = "", ()      # no demo project: real video, no bouncing samples
  c.data.height, c.data.width = 480, 832
  c.data.clip_frames, c.data.stride, c.data.frames_per_chunk = 96, 96, 24
  c.objective.chunk_width = 6
  c.vae.kind = "official"          # latent space: frames are encoded per chunk by the VAE
  c.vae.precision = "bf16"
  c.optim.warmup_steps = 100
  c.sample_at_end = False
  return c


def magi_4p5b_training():
  """`train_config()` for training the 4.5B base architecture in full, the report's recipe
  (TRAINING.md), shared by the stage configs magi_4p5b_stage{1,2,3}.py, which set resolution,
  clip length, buckets, prepared directory and init: bf16 with float32 masters, remat, AdamW
  (0.9, 0.95), weight decay 0.1, peak lr 1e-4 after a 1,000-step warm-up, constant; 1-s chunks
  (24 frames = 6 latent frames); images : videos 4 : 1; trained on latents and T5 rows
  prepared offline (`python -m experiments.prepare` with the same config), so the step never
  runs the VAE or T5. Open in the report, chosen here: batch, steps, EMA (below)."""
  from magi_jax.configs import get_preset
  c = official_video_finetune()
  c.init.kind = "random"
  c.data.kind = "prepared"
  c.data.frames_per_chunk = 24     # 1 s at 24 fps
  c.objective.chunk_width = 6      # latent frames per chunk (the VAE compresses time 4x)
  # T5 rows as wide as the DiT's caption rows (the official 800 tokens).
  c.text.max_length = get_preset("4.5B_base").model.caption_max_length
  c.data.min_chunks = 1            # random sub-clips of 1..max chunks: lengths up to the stage's
  c.data.image_ratio = 4.0         # the report's image : video mix, in every stage
  c.data.val_fraction = 0.01       # 1% of the videos held out for the validation loss
  c.validation.every = 1000
  c.checkpoint_every = 1000
  c.optim.lr = 1e-4
  c.optim.b1, c.optim.b2 = 0.9, 0.95
  c.optim.weight_decay = 0.1
  # Every stage warms up again: its optimizer moments start from zero (a new run).
  c.optim.warmup_steps = 1000
  c.optim.schedule = "constant"
  # Open: an EMA of the weights, which the next stage starts from (init.use_ema).
  c.ema_decay = 0.9999
  return c


# The tiny T5 of the test fixtures (width 64), which the stage configs' :smoke variants use.
TINY_T5 = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                        os.pardir, "tests", "fixtures", "text", "t5_tiny"))


def stage_smoke(c, *, total_steps: int):
  """A stage config on tiny shapes that trains in seconds on a CPU (CI, tests/test_stages.py):
  the same data path (prepared latents + T5 rows of a random tiny VAE and the tiny T5 fixture),
  init and schedule kinds, on a 1-layer tiny DiT, 32x32 frames, chunks of 8 frames (2 latent
  frames), clips of 2 chunks, rows of 2 chunks, a checkpoint at the end. One prepared directory
  serves all three stages (the same shapes); no images, buckets or held-out split. Pass
  --config.data.video_dir (prepare) and --config.data.prepared_dir (both)."""
  c.total_steps = total_steps
  c.checkpoint_every = total_steps
  c.log_every = 1
  c.tensorboard = False
  c.model.preset = "tiny"
  c.model.precision = "fp32"
  c.model.remat = False
  c.model.overrides = dict(num_layers=1, hidden_size=64, ffn_hidden_size=128,
                           num_attention_heads=2, num_query_groups=1, kv_channels=32,
                           caption_channels=64, caption_max_length=16)
  c.vae.kind, c.vae.path, c.vae.precision = "random_tiny", "", "fp32"   # 16 ch, 8x, 4x time
  c.text.t5_path, c.text.max_length = TINY_T5, 16
  d = c.data
  d.video_dir, d.prepared_dir = "", ""
  d.height = d.width = 32
  d.frames_per_chunk, d.clip_frames, d.stride = 8, 16, 16
  d.batch_size, d.bin_chunks, d.pack_window, d.min_chunks = 2, 2, 4, 1
  d.buckets, d.image_ratio, d.val_fraction = (), 0.0, 0.0
  c.validation.every = 0
  c.objective.chunk_width = 2
  c.optim.warmup_steps = 1
  c.ema_decay = 0.5                # an EMA unlike the raw weights: the next stage starts from it
  return c
