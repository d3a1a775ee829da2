"""The capacity planner (magi_jax.aot): the project's programs compiled for TPU topologies.

Tiny preset only, on v5e:1x1 (one chip) and v5e:2x2 (four): the sampler steps, T5 and VAE,
and the train step (full, and LoRA: adapters only trained, the base frozen) compile with fits
true and sane per-device figures; an absurd video size
is refused by the TPU compiler and reported with its message (not raised); bad arguments
raise AOTError / exit 2 before anything compiles. Needs libtpu (`pip install -e ".[aot]"`).
"""

import importlib.util
import json
import math

import jax
import pytest
from flax import nnx

if importlib.util.find_spec("libtpu") is None:
  pytest.skip('libtpu is not installed (pip install -e ".[aot]"): the planner compiles for TPU '
              "topologies through it", allow_module_level=True)

from magi_jax.aot import AOTError, plan  # noqa: E402
from magi_jax.aot import compile as aot_compile  # noqa: E402
from magi_jax.aot import topology  # noqa: E402
from magi_jax.aot.__main__ import main  # noqa: E402
from magi_jax.aot.report import table  # noqa: E402
from magi_jax.aot.sizes import size_for_tokens  # noqa: E402
from magi_jax.aot.steady import default_chunks, steady_calls  # noqa: E402
from magi_jax.configs import get_preset  # noqa: E402
from magi_jax.models import Precision, VideoDiT  # noqa: E402
from magi_jax.train import lora  # noqa: E402

V5E_HBM = 15.75


def check_fits(reports):
  for r in reports:
    assert r.fits and r.error is None, r
    assert r.args_gib > 0 and r.temp_gib >= 0
    assert r.peak_gib >= r.args_gib - r.alias_gib
    assert r.peak_gib <= r.hbm_gib        # the compiler's own peak: it accepted the program
    assert r.hbm_gib == V5E_HBM and r.compile_s > 0


@pytest.fixture(scope="module")
def train_one_chip():
  return plan(job="train", preset="tiny", topology="v5e:1x1")


def test_sample_one_chip():
  reports = plan(job="sample", preset="tiny", topology="v5e:1x1")
  assert [r.program for r in reports] == ["step+refresh", "step+cache1", "t5", "vae"]
  check_fits(reports)
  assert all(r.devices == 1 and r.mesh == "data:1,fsdp:1,context:1,tensor:1" for r in reports)
  assert "1 cached" in reports[1].notes and "cache_k" in reports[1].notes


def test_train_one_chip(train_one_chip):
  (r,) = train_one_chip
  check_fits([r])
  assert r.program == "step" and r.alias_gib > 0       # the state is donated
  assert r.peak_gib >= r.args_gib


@pytest.mark.parametrize("mesh, desc, chunks", [
    # Sequence over 'context' (the 'auto' backend picks ring attention; 4 chunks split over
    # 2 devices zig-zag), state over 'fsdp' (fsdp alone: the distill case below).
    ("context:2,fsdp:-1", "data:1,fsdp:2,context:2,tensor:1", 4),
], ids=["context2_fsdp2"])
def test_train_on_four_devices(mesh, desc, chunks, train_one_chip):
  (r,) = plan(job="train", preset="tiny", topology="v5e:2x2", mesh=mesh, chunks=chunks)
  check_fits([r])
  assert r.devices == 4 and r.mesh == desc
  # Weights and AdamW moments are split over fsdp: less state per device than on one chip.
  assert r.args_gib < train_one_chip[0].args_gib


def finetune_lora_config():
  from experiments.configs import finetune_lora
  return finetune_lora.get_config().lora


def adapter_parameters(preset: str, rank: int, alpha: float, targets) -> tuple[int, int]:
  """(what train.lora's adapters hold, rank x (in + out) per layer and target by hand) for
  the preset's DiT: two counts that do not go through the planner."""
  cfg = get_preset(preset)
  make = lambda: VideoDiT(cfg.model, precision=Precision.bf16(), rngs=nnx.Rngs(0))
  adapted = nnx.eval_shape(lambda: lora.apply_lora(make(), rank=rank, alpha=alpha,
                                                   targets=targets, rngs=nnx.Rngs(1)))
  from_lora = sum(math.prod(x.shape) for x in jax.tree.leaves(lora.lora_state(adapted)))
  layers = nnx.eval_shape(make).layers
  by_hand = 0
  for t in targets:
    n_layers, d_in, d_out = getattr(layers, t).kernel.shape
    by_hand += n_layers * rank * (d_in + d_out)
  return from_lora, by_hand


def test_lora_train_step(train_one_chip):
  """The LoRA fine-tune's step (finetune_lora.py's rank and alpha): it compiles, says it is a
  LoRA job, holds less per device than full training (bf16 frozen base, fp32 masters and AdamW
  moments for the adapters only), and trains exactly the adapters train.lora makes; sharded
  over fsdp on four devices it holds less again."""
  c = finetune_lora_config()
  assert tuple(c.targets) == lora.DEFAULT_TARGETS        # the planner's adapters: the config's
  (r,) = plan(job="train", preset="tiny", topology="v5e:1x1", lora_rank=c.rank,
              lora_alpha=c.alpha)
  (full,) = train_one_chip
  check_fits([r])
  assert (r.lora_rank, r.lora_alpha, full.lora_rank) == (16, 16.0, 0)
  assert "LoRA rank 16, alpha 16 on q,k,v,qx,kx,vx,proj,fc1,fc2" in r.notes
  assert "train (LoRA rank 16, alpha 16) tiny" in table([r])
  assert r.args_gib < 0.5 * full.args_gib
  from_lora, by_hand = adapter_parameters("tiny", c.rank, c.alpha, tuple(c.targets))
  assert r.trainable_params == from_lora == by_hand > 0
  assert f"{from_lora:,} trainable parameters" in table([r])
  assert full.trainable_params > r.trainable_params       # tiny: rank 16 is 20% of it
  (four,) = plan(job="train", preset="tiny", topology="v5e:2x2", mesh="fsdp:4",
                 lora_rank=c.rank)
  check_fits([four])
  assert four.trainable_params == from_lora and four.lora_alpha == 16.0   # alpha: the rank
  assert four.args_gib < r.args_gib


def test_distill_step_on_four_devices(train_one_chip):
  """A distillation run's step: the student trains, the bf16 teacher rides in the frozen
  state (more arguments than the base step's), both branches in one program."""
  (one,) = plan(job="distill", preset="tiny", topology="v5e:1x1")
  check_fits([one])
  assert one.job == "distill" and "frozen bf16 teacher" in one.notes
  assert one.args_gib > train_one_chip[0].args_gib
  (four,) = plan(job="distill", preset="tiny", topology="v5e:2x2", mesh="fsdp:4")
  check_fits([four])
  assert four.mesh == "data:1,fsdp:4,context:1,tensor:1" and four.args_gib < one.args_gib


def test_sample_on_four_devices():
  reports = plan(job="sample", preset="tiny", topology="v5e:2x2", mesh="data:2,tensor:2",
                 programs="step")
  assert [r.program for r in reports] == ["step+refresh", "step+cache1"]
  check_fits(reports)
  assert reports[0].mesh == "data:2,fsdp:1,context:1,tensor:2"


def test_refusal_is_reported_by_the_command(capsys):
  rc = main(["aot", "--job=sample", "--preset=tiny", "--topology=v5e:1x1", "--programs=step",
             "--chunks=1", "--height=16384", "--width=16384", "--json"])
  out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert rc == 1 and len(out) == 1
  r = out[0]
  assert r["fits"] is False and r["program"] == "step"
  assert "exceeds available HBM (15.75G)" in r["error"]
  assert r["peak_gib"] > r["hbm_gib"] == V5E_HBM and r["args_gib"] > 0 and r["temp_gib"] is None


@pytest.mark.parametrize("request_, match", [
    (dict(topology="v9:2x2"), "unknown chip kind 'v9'"),
    (dict(topology="v5e"), "expected KIND:AxB"),
    (dict(topology="v5p:2x2"), "3 positive dimensions"),
    (dict(topology="v5e:2x2", mesh="fsdp:3"), "has 3 devices, but there are 4"),
    (dict(topology="v5e:2x2", mesh="fsdp:-1,tensor:3"), "do not divide"),
    (dict(topology="v5e:2x2", mesh="pipeline:4"), "AXIS:SIZE"),
    (dict(height=72, width=64), "multiple of 16"),
    (dict(height=64), "both --height and --width"),
    (dict(preset="7B"), "unknown preset"),
    (dict(programs="step,decoder"), "unknown: decoder"),
    (dict(job="sample", tokens=4096), "--tokens is for --job=train"),
    (dict(tokens=8, chunks=2), "not both"),
    (dict(topology="v5e:2x2", mesh="context:4", chunks=6), "6 chunks per row do not split"),
    (dict(job="distill", preset="4.5B_distill"), "the teacher's base preset"),
    (dict(job="sample", lora_rank=16), "--lora_rank=16 is for --job=train or --job=distill"),
    (dict(lora_alpha=16.0), "--lora_alpha=16.0 without --lora_rank"),
    (dict(lora_rank=-1), "non-negative integer"),
    (dict(lora_rank=4, lora_alpha=float("inf")), "finite number"),
])
def test_argument_errors_before_compiling(request_, match, monkeypatch):
  def no_compile(*a, **k):
    raise AssertionError("compiled despite a bad argument")
  monkeypatch.setattr(aot_compile, "compile_program", no_compile)
  kw = dict(job="train", preset="tiny", topology="v5e:1x1") | request_
  with pytest.raises(AOTError, match=match):
    plan(**kw)


def test_command_exit_2_on_bad_arguments(capsys):
  assert main(["aot", "--job=train", "--preset=tiny", "--topology=v5e:2x2", "--mesh=fsdp:3"]) == 2
  assert "fsdp" in capsys.readouterr().err
  assert main(["aot", "--job=train", "--preset=tiny"]) == 2
  assert "missing --topology" in capsys.readouterr().err
  assert main(["aot", "--job=fly", "--preset=tiny", "--topology=v5e:1x1"]) == 2
  capsys.readouterr()
  assert main(["aot", "--job=sample", "--preset=tiny", "--topology=v5e:1x1",
               "--lora_rank=16"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --lora_rank=16 is for --job=train") and err.count("\n") == 1


def test_missing_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setattr(topology, "libtpu_installed", lambda: False)
  with pytest.raises(AOTError, match=r'pip install -e "\.\[aot\]"'):
    topology.require_libtpu()
  with pytest.raises(AOTError, match="libtpu"):
    plan(job="train", preset="tiny", topology="v6e:2x2")


def test_topology_devices_and_hbm_table():
  one = topology.get_topology("v5e:1x1")
  assert one.num_devices == 1 and topology.host_bounds((1, 1)) == (1, 1, 1)
  four = topology.get_topology("v5e:2x2")
  assert four.num_devices == 4 and four.chip.usable_gib == V5E_HBM
  assert topology.get_topology("v4:2x2x1").num_devices == 8        # one device per TensorCore
  assert topology.parse_topology("v5e:2x2x1")[1] == (2, 2)


def test_tokens_rule():
  s = size_for_tokens(get_preset("24B_base"), 4_194_304)
  assert (s.height, s.width, s.chunks, s.tokens_per_chunk) == (720, 1280, 194, 21_600)
  assert s.tokens == 4_190_400
  s = size_for_tokens(get_preset("4.5B_base"), 40_000, 480, 832)
  assert (s.chunks, s.tokens_per_chunk) == (4, 9_360)
  # On context 128 the chunks must split (zig-zag: multiples of 256): 720p would keep only
  # 128 chunks (2.76M tokens); 480x480 keeps 768 x 5,400 = 4,147,200.
  s = size_for_tokens(get_preset("24B_base"), 4_194_304, context=128)
  assert (s.height, s.width, s.chunks, s.tokens) == (480, 480, 768, 4_147_200)
  s = size_for_tokens(get_preset("4.5B_base"), 40_000, 480, 832, context=2)
  assert s.chunks == 4                                   # 4 = 2 x 2: zig-zag on context 2
  with pytest.raises(AOTError, match="fewer than 8 chunks"):
    size_for_tokens(get_preset("4.5B_base"), 40_000, 480, 832, context=8)


def test_steady_state_of_the_official_window():
  cfg = get_preset("4.5B_distill")
  n = default_chunks(cfg)
  calls = steady_calls(cfg, n)
  assert n == 10 and [c.name for c in calls] == ["step+refresh+nearly", "step+cache1+nearly"]
  refresh, cached = calls
  assert (refresh.call_chunks, refresh.cache_chunks) == (5, 0)     # window + finished chunk
  assert (cached.call_chunks, cached.cache_chunks) == (4, 1)
