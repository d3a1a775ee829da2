"""The training loop: data -> jitted step -> metrics, checkpoints, samples; resumable.

`train(config, workdir)` runs a whole run or continues one: if `<workdir>/checkpoints` holds a
checkpoint, the model, optimizer, EMA, step, key and data position are restored from it, so
an interrupted run (SIGTERM, preemption, kill -9) resumes to the same parameters an
uninterrupted run reaches. SIGTERM saves a checkpoint at the current step and returns.

A workdir of another config is refused before any work (`resume.check_resume`); a checkpoint
that does not restore is moved aside and the newest intact one resumes
(`Checkpointer.restore_newest_intact`); with synchronous saves (the default) a crash loses at
most `checkpoint_every` steps (log lines name the newest committed checkpoint); after a resume
metrics.jsonl and TensorBoard hold each step once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import numpy as np
from flax import nnx

from magi_jax.errors import MagiError
from magi_jax.configs import ConfigError
from magi_jax.parallel.mesh import describe
from magi_jax.parallel.rules import axis_size, use_mesh
from magi_jax.train import build, stages
from magi_jax.train.checkpoint import Checkpointer
from magi_jax.train.metrics import MetricsLog, plot_loss_curve
from magi_jax.train.project import evaluators
from magi_jax.train.resume import check_resume
from magi_jax.train.step import TrainState, init_state, make_train_step, mesh_shardings


class TrainingError(MagiError, RuntimeError):
  """The run cannot continue (e.g. repeated non-finite losses)."""


@dataclasses.dataclass
class RunResult:
  step: int
  state: TrainState
  model: object            # TrainModel with the trained (EMA if enabled) weights
  stopped_by_signal: bool
  last_metrics: dict


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after every step."""

  def __init__(self):
    self.received = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:          # not the main thread (e.g. a notebook worker): no handler
      self._old = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def trainable_filter(c):
  """LoRA adapters, or every parameter; never the teacher of a distillation run."""
  base = nnx.LoRAParam if c.lora.rank else nnx.Param
  return nnx.All(base, nnx.Not(nnx.PathContains("teacher"))) if build.distilling(c) else base


def load_teacher(c, model, echo=print) -> None:
  """A distillation run's teacher weights into `model.teacher` and, as the student's start,
  into `model.dit` and `model.text_encoder` (a resumed run restores the student over them).

  `config.distill.teacher`: a base run's workdir (its latest checkpoint, EMA weights when it
  kept an EMA), or 'init' (the config's init weights, already in place)."""
  where = c.distill.teacher
  if where == "init":
    return
  tc, teacher, _, step = load_trained(where)
  if build.distilling(tc):
    raise ConfigError(f"config.distill.teacher={where!r} is itself a distillation run")
  for field, mine, theirs in (("model", build.model_config(c), build.model_config(tc)),
                              ("model.prediction", c.model.prediction, tc.model.prediction),
                              ("text", c.text.to_dict(), tc.text.to_dict())):
    if mine != theirs:
      raise ConfigError(f"config.{field} differs from the teacher run's ({where}): {mine} vs "
                        f"{theirs}; a student has its teacher's architecture")
  if tc.lora.rank:
    from magi_jax.train.lora import merge_lora
    teacher.dit = merge_lora(teacher.dit)
  weights = nnx.state(teacher.dit, nnx.Param)
  nnx.update(model.teacher.dit, weights)
  nnx.update(model.dit, jax.tree.map(jax.numpy.copy, weights))
  if teacher.text_encoder is not None:
    text = nnx.state(teacher.text_encoder, nnx.Param)
    nnx.update(model.teacher.text_encoder, text)
    nnx.update(model.text_encoder, jax.tree.map(jax.numpy.copy, text))
  echo(f"teacher: {where} at step {step}")


def split_model(c, model):
  """graphdef, trainable state, frozen state (LoRA's base weights; empty otherwise)."""
  return nnx.split(model, trainable_filter(c), ...)


def compute_dtypes(params):
  return jax.tree.map(lambda x: x.dtype, params)


def train(c, workdir: str, *, data=None, echo=print, devices=None) -> RunResult:
  """Trains (or resumes) the run of config `c` in `workdir`.

  data: optional iterator of this process's batch rows overriding the config's data (tests);
  it is not checkpointed unless it has grain's get_state/set_state.
  devices: the devices the mesh (`config.mesh`) is laid over (default: all of them).
  """
  check_resume(c, workdir, echo)      # a workdir of another run: refused before any work
  from magi_jax.train.data import check_prepared_data
  check_prepared_data(c)              # prepared data that does not fit: refused as early
  from_run = stages.check_start(c, workdir, echo)    # init.kind='run': a previous run's weights
  os.makedirs(workdir, exist_ok=True)
  evals = evaluators(c)               # resolved now: a misspelt name fails before step 0
  tokenizer = build.tokenizer_for(c)
  model = build.build_model(c, tokenizer, echo=echo)
  if build.distilling(c):
    load_teacher(c, model, echo)
  obj = build.objective(c)
  graphdef, params, frozen = split_model(c, model)
  dtypes = compute_dtypes(params)     # the config's, before a previous run's float32 masters
  if from_run and not c.lora.rank:    # (a LoRA run's base came with build_model)
    stages.start_from_run(c, model, echo)
    graphdef, params, frozen = split_model(c, model)
  schedule, tx = build.optimizer(c)
  mesh, rules = build.mesh(c, devices), build.sharding_rules(c)
  check_batch(c, mesh, rules)
  make_state = lambda p: init_state(p, tx, seed=c.seed, ema=c.ema_decay > 0)
  sh = mesh_shardings(jax.eval_shape(make_state, params), frozen, mesh, rules)
  # Built by a jit that writes each device's shard: the optimizer moments and the EMA never
  # exist unsharded.
  state = jax.jit(make_state, out_shardings=sh.state)(params)
  frozen = jax.device_put(frozen, sh.frozen)
  if data is None:
    from magi_jax.train.data import train_iterator
    data = train_iterator(c, tokenizer, workdir, echo=echo)
  ckpt_data = data if hasattr(data, "get_state") else None    # saved with the state

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints,
                      every=c.checkpoint_every, async_save=c.async_checkpoints)
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    state, start = ckpt.restore_newest_intact(abstract, ckpt_data, echo)
    echo(f"resumed from {ckpt.directory}/{start} (step {int(state.step)})")
  ckpt.write_run({"config": c.to_dict()})

  use_bf16 = c.model.precision == "bf16"
  step_fn = make_train_step(graphdef, obj, tx, schedule,
                            compute_dtypes=dtypes if use_bf16 else None,
                            ema_decay=float(c.ema_decay), encode_frames=build.frame_encoder(c),
                            latent_scale=float(c.vae.scale_factor),
                            shardings=sh)
  if mesh.size > 1:
    echo(f"mesh {describe(mesh)} over {jax.process_count()} process(es)")
  # Sample videos and the LoRA export are single-host conveniences: in a multi-host run sample
  # or export from the checkpoint afterwards (`load_trained`, `experiments.sample`).
  single_host = jax.process_count() == 1
  if not single_host and (c.sample_every or c.sample_at_end or c.lora.rank):
    echo("multi-host run: sample videos and the LoRA export are skipped; make them from the "
         "checkpoint on one host")
  validate = None
  if c.get("validation") and c.validation.every:
    from magi_jax.train.validation import Validator
    validate = Validator(c, graphdef, obj, compute_dtypes=dtypes if use_bf16 else None,
                         shardings=sh, place=lambda b: global_batch(b, sh.batch), echo=echo)
  step = int(state.step)
  log = MetricsLog(workdir, total_steps=c.total_steps, enabled=c.tensorboard, resume_step=step)
  first_step = step
  pending, last = [], {}       # this interval's metrics, still on device
  stopped = False

  def drain():
    """Fetches the pending metrics in one transfer, reports skipped updates, and stops the run
    once `max_consecutive_nans` non-finite steps came in a row (the streak is the state's)."""
    fetched = fetch_metrics(pending)
    first = step - len(fetched) + 1
    pending.clear()
    for at, m in enumerate(fetched, start=first):
      log.add(m)
      if int(m["finite"]):
        continue
      streak = int(m["nan_streak"])
      echo(f"step {at}: non-finite loss ({float(m['loss'])}) or gradient norm "
           f"({float(m['grad_norm'])}); update skipped ({streak} in a row)")
      if streak >= c.max_consecutive_nans:
        log.flush(at)                 # the skipped steps reach metrics.jsonl / TensorBoard
        log.close()
        ckpt.wait()
        good = ckpt.latest_step()
        ran_on = (f"; the run had reached step {step} when the metrics were read"
                  if at < step else "")
        raise TrainingError(
            f"{streak} consecutive non-finite steps (last at step {at}{ran_on}); stopping. The "
            f"last good checkpoint is step {good} in {ckpt.directory}. Lower optim.lr, check "
            "the data for NaN/inf, or raise max_consecutive_nans.")

  with _Preemption() as preempt, use_mesh(mesh, rules):
    while step < c.total_steps:
      batch = global_batch(next(data), sh.batch)
      state, m = step_fn(state, frozen, batch)
      step += 1
      pending.append(m)         # no host sync here: the next step is dispatched at once
      log_now = step % c.log_every == 0 or step == c.total_steps
      # Metrics are read at log steps, and before a checkpoint or a signal exit so that a
      # run stopping on non-finite steps never writes a checkpoint past the streak.
      if log_now or step % ckpt.every == 0 or preempt.received:
        drain()
      ckpt.save(step, state, ckpt_data)
      if log_now:
        last = log.flush(step)
        echo(log.line(step, last, step - first_step, committed=ckpt.committed_step()))
      if validate is not None and (step % c.validation.every == 0 or step == c.total_steps):
        validate(state, frozen, step, log)
      if single_host and c.sample_every and step % c.sample_every == 0 and step < c.total_steps:
        run_evals(evals, c, nnx.merge(graphdef, final_params(state), frozen), tokenizer, workdir,
                  step, log, echo)
      if preempt.received:
        ckpt.save(step, state, ckpt_data, force=True)
        ckpt.wait()
        echo(f"SIGTERM: saved checkpoint {step} in {ckpt.directory}; exiting")
        stopped = True
        break
  if not stopped:
    ckpt.save(step, state, ckpt_data, force=True)
  ckpt.wait()
  ckpt.close()
  log.close()
  if not stopped and log.primary:
    plot_loss_curve(log.history_path, os.path.join(workdir, "loss.png"))
  trained = nnx.merge(graphdef, final_params(state), frozen)
  if c.lora.rank and not stopped and single_host:
    export_lora(c, trained, workdir, echo)
  if build.distilling(c) and c.distill.get("export_official") and not stopped and single_host:
    export_distilled(trained, workdir, echo)
  if single_host and not stopped and c.sample_at_end:
    run_evals(evals, c, trained, tokenizer, workdir, step, None, echo)
  return RunResult(step, state, trained, stopped, last)


def fetch_metrics(pending: list) -> list:
  """The device metrics of the steps since the last read, to the host in one transfer (the
  loop's only wait on the device outside checkpoints and evaluations)."""
  return jax.device_get(pending)


def check_batch(c, mesh, rules) -> None:
  axes = rules.spec(("batch",))[0]
  split = axis_size(mesh, axes)
  if not split or c.data.batch_size % split or c.data.batch_size % jax.process_count():
    raise ConfigError(f"data.batch_size ({c.data.batch_size}) is the global batch: it must divide "
                      f"by the devices along the batch axes {axes} ({split}) and by the process "
                      f"count ({jax.process_count()})")


def global_batch(local, sharding):
  """This process's rows of the batch -> global arrays split by `sharding` (any process count)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def export_lora(c, trained, workdir: str, echo) -> None:
  """The adapters alone (`lora.safetensors`), and with `lora.export_merged` the merged model
  in the official layout (`merged_dit/`), loadable by every official-checkpoint path."""
  from magi_jax.train.lora import merge_lora, save_lora
  path = os.path.join(workdir, "lora.safetensors")
  save_lora(path, trained.dit)
  echo(f"wrote LoRA adapters to {path}")
  if c.lora.export_merged:
    from magi_jax.official.dit import save_official_dit
    out = os.path.join(workdir, "merged_dit")
    save_official_dit(merge_lora(trained.dit), out)
    echo(f"wrote the merged DiT (official layout) to {out}")


def export_distilled(trained, workdir: str, echo) -> str:
  """The student in the official layout (`distilled_dit/`, LoRA adapters merged): the key set
  of the official distilled checkpoints, which is the base key set (the distilled DiT adds no
  parameters); load it with `distill=True` (`load_official_dit`, `experiments.sample` with a
  distill preset)."""
  from magi_jax.official.dit import save_official_dit
  from magi_jax.train.lora import merge_lora, lora_config
  dit = trained.dit
  if lora_config(dit) is not None:
    dit = merge_lora(dit)
  out = os.path.join(workdir, "distilled_dit")
  save_official_dit(dit, out)
  echo(f"wrote the distilled DiT (official layout) to {out}")
  return out


def final_params(state: TrainState):
  return state.ema if state.ema is not None else state.params


def run_evals(evals, c, model, tokenizer, workdir, step, log, echo):
  """Each of the config's evaluators (`config.evals`, resolved by magi_jax/train/project.py)."""
  for fn in evals:
    t0 = time.time()
    fn(c, model, tokenizer, workdir, step, log, echo)
    echo(f"eval {getattr(fn, '__name__', fn)} at step {step}: {time.time() - t0:.0f} s")


def load_trained(workdir: str, *, step: int | None = None, use_ema: bool = True):
  """(config, TrainModel, tokenizer, step) of a run directory's latest (or given) checkpoint."""
  import ml_collections
  ckdir = os.path.join(workdir, "checkpoints")
  c = ml_collections.ConfigDict(Checkpointer.read_run(ckdir)["config"])
  tokenizer = build.tokenizer_for(c)
  model = build.build_model(c, tokenizer, with_teacher=False)    # a student without its teacher
  graphdef, params, frozen = split_model(c, model)
  schedule, tx = build.optimizer(c)
  abstract = jax.eval_shape(lambda p: init_state(p, tx, seed=c.seed, ema=c.ema_decay > 0), params)
  ckpt = Checkpointer(ckdir, keep=c.keep_checkpoints, every=c.checkpoint_every)
  try:
    state = ckpt.restore(abstract, step=step)
    step = int(state.step)
  finally:
    ckpt.close()
  p = final_params(state) if use_ema else state.params
  return c, nnx.merge(graphdef, p, frozen), tokenizer, step
