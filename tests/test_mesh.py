"""The mesh from config and the sharding-rule tables (one device; `use_mesh` on 8 CPU
devices)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from magi_jax.parallel.mesh import AXES, MeshConfig, MeshError, make_mesh, mesh_shape
from magi_jax.parallel.rules import (ShardingRules, constrain, fit_spec, path_string,
                                     tree_shardings, use_mesh)
from multidevice import eight_devices


def test_auto_axis_takes_the_remaining_devices():
  assert mesh_shape(MeshConfig(), 8) == dict(data=8, fsdp=1, context=1, tensor=1)
  assert mesh_shape(MeshConfig(data=1, fsdp=-1, context=4), 32) == dict(data=1, fsdp=8,
                                                                         context=4, tensor=1)
  assert mesh_shape(MeshConfig(data=4, fsdp=2, context=1, tensor=1, dcn_data=2), 8)["data"] == 4


@pytest.mark.parametrize("cfg, n, match", [
    (MeshConfig(data=-1, fsdp=-1), 8, "at most one mesh axis"),
    (MeshConfig(data=1, context=3), 8, "has 3 devices, but there are 8"),
    (MeshConfig(data=-1, context=3), 8, "do not divide"),
    (MeshConfig(data=0), 8, "positive or -1"),
    (MeshConfig(data=2, fsdp=4, dcn_data=4), 8, "multiple of mesh.dcn_data"),
])
def test_bad_meshes_name_the_problem(cfg, n, match):
  with pytest.raises(MeshError, match=match):
    mesh_shape(cfg, n)


def test_config_fields_are_checked():
  assert MeshConfig.from_config({"context": 2, "data": -1}) == MeshConfig(context=2)
  with pytest.raises(MeshError, match="unknown field"):
    MeshConfig.from_config({"sequence": 2})


def test_one_device_mesh_and_multislice_error():
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  assert mesh.axis_names == AXES and mesh.size == 1
  with pytest.raises(MeshError, match="dcn_data=2"):
    make_mesh(MeshConfig(data=2, dcn_data=2), jax.devices()[:1] * 2)


def test_rules_map_logical_names_and_parameter_paths():
  r = ShardingRules()
  assert r.spec(("batch", "length", "act_embed")) == P(("data", "fsdp"), "context", None)
  # The stacked layer's parameters: a leading layer axis, never sharded.
  assert r.param_names("dit/layers/q/kernel", 3) == (None, "embed", "heads")
  assert r.param_names("opt_state/0/mu/dit/layers/fc2/kernel", 3) == (None, "mlp", "embed")
  assert r.param_names("dit/layers/q/lora_b", 3) == (None, None, "heads")
  assert r.param_names("dit/layers/q_norm/weight", 2) == (None, None)
  assert r.param_names("dit/layers/q/kernel", 2) == (None, None)      # rank must match
  assert r.param_names("dit/x_embedder/kernel", 2) == (None, "embed")


def test_config_overrides_and_bad_regex():
  r = ShardingRules.from_config({"logical": [["batch", "data"], ["embed", None]], "params": []})
  assert r.spec(("batch",)) == P("data") and r.params  # empty params -> the default table
  with pytest.raises(ValueError, match="bad regex"):
    ShardingRules.from_config({"params": [["layers/(", ["embed"]]]})


def test_fit_spec_replicates_what_does_not_divide():
  import numpy as np
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 1).reshape(1, 1, 1, 1), AXES)
  assert fit_spec(P("fsdp", None), (3, 4), mesh) == P("fsdp", None)   # size-1 axes divide all


def test_paths_drop_the_variable_value_suffix():
  from flax import nnx

  class M(nnx.Module):
    def __init__(self):
      self.q = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

  paths = [path_string(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(M()))]
  assert "q/kernel" in paths and "q/bias" in paths


def test_constrain_is_a_no_op_without_a_mesh_and_shards_with_one():
  x = jnp.ones((2, 8, 4))
  assert constrain(x, ("batch", "length", "act_embed")) is x
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  with use_mesh(mesh):
    y = jax.jit(lambda a: constrain(a, ("batch", "length", "act_embed")) * 2)(x)
  assert float(y.sum()) == 128.0
  sh = tree_shardings({"dit": {"layers": {"q": {"kernel": x}}}}, mesh, ShardingRules())
  assert sh["dit"]["layers"]["q"]["kernel"].spec == P(None, ("fsdp", "context"), "tensor")


def test_axes_the_mesh_lacks_do_not_split():
  import numpy as np
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  assert fit_spec(P("tensor", "data"), (4, 4), mesh) == P(None, "data")


# ---------------------------------------------------------------------------------------------
# Parameters no rule places; the real models' parameters all are.

def test_logical_table_takes_entries_in_order_without_reusing_a_mesh_axis():
  from magi_jax.parallel.rules import logical_to_mesh_axes
  table = (("a", ("x", "y")), ("b", "y"), ("b", "z"), ("c", None))
  assert logical_to_mesh_axes(("a", "b", "c", None), table) == P(("x", "y"), "z", None, None)
  assert logical_to_mesh_axes(("b", "unknown"), table) == P("y", None)
  with pytest.raises(ValueError, match="more than one dim"):
    logical_to_mesh_axes(("a", "a"), table)


def _fresh_warnings(monkeypatch):
  from magi_jax.parallel import rules
  monkeypatch.setattr(rules, "_WARNED", set())


def test_unmatched_parameter_warns_once_and_strict_raises(monkeypatch):
  import warnings

  from magi_jax.parallel.rules import ShardingRuleError, UnplacedParameterWarning
  _fresh_warnings(monkeypatch)
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  tree = {"dit": {"mystery": {"kernel": jnp.ones((4, 4))}, "bias": jnp.ones((4,)),
                  "layers": {"q": {"kernel": jnp.ones((2, 4, 4))}}}}
  with pytest.warns(UnplacedParameterWarning, match=r"dit/mystery/kernel \(4, 4\)") as rec:
    sh = tree_shardings(tree, mesh, ShardingRules())
  assert len(rec) == 1 and "dit/bias" not in str(rec[0].message)       # rank 1: no warning
  assert sh["dit"]["mystery"]["kernel"].spec == P(None, None)           # replicated
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tree_shardings(tree, mesh, ShardingRules())                         # once per path
  strict = ShardingRules.from_config({"strict": True})
  assert strict.strict and not ShardingRules.from_config({}).strict
  with pytest.raises(ShardingRuleError, match=r"dit/mystery/kernel \(4, 4\).*strict"):
    tree_shardings(tree, mesh, strict)
  # An entry that replicates on purpose (logical axes None) places it, any rank.
  from magi_jax.parallel.rules import PARAM_RULES
  on_purpose = ShardingRules.from_config({"params": [["mystery/", None], *PARAM_RULES],
                                          "strict": True})
  assert tree_shardings(tree, mesh, on_purpose)["dit"]["mystery"]["kernel"].spec == P(None, None)
  with pytest.raises(ValueError, match="strict must be true or false"):
    ShardingRules.from_config({"strict": "yes"})


def _strict_shardings(tree, rules=None):
  rules = dataclasses.replace(rules or ShardingRules(), strict=True)
  return tree_shardings(tree, make_mesh(MeshConfig(), jax.devices()[:1]), rules)


def test_default_rules_place_every_parameter_of_the_models():
  from flax import nnx

  from conftest import make_model
  from magi_jax.aot import components
  from magi_jax.configs import get_preset
  from magi_jax.convert.load import TINY_VAE
  from magi_jax.models import Precision
  from magi_jax.models.vae import ViTVAE
  from magi_jax.text.t5 import T5Encoder

  _strict_shardings(nnx.state(make_model()))
  _strict_shardings(nnx.state(make_model(distill=True)))
  cfg = get_preset("tiny")
  vae = nnx.eval_shape(lambda: ViTVAE(TINY_VAE, precision=Precision.bf16(), rngs=nnx.Rngs(0)))
  _strict_shardings(nnx.state(vae), components.vae_rules(ShardingRules()))
  t5 = nnx.eval_shape(lambda: T5Encoder(components.t5_config(cfg), rngs=nnx.Rngs(0)))
  _strict_shardings(nnx.state(t5), components.t5_rules(ShardingRules()))


def test_default_rules_place_lora_adapters_on_every_target():
  from flax import nnx

  from conftest import make_model
  from magi_jax.train.lora import apply_lora

  model = make_model()
  targets = ("q", "k", "v", "qx", "kx", "vx", "proj", "fc1", "fc2", "ada_modulate")
  apply_lora(model, rank=4, alpha=4.0, targets=targets, rngs=nnx.Rngs(1))
  _strict_shardings(nnx.state(model, nnx.LoRAParam))


def test_default_rules_place_the_demo_train_state():
  from experiments.configs import bouncing_tiny
  from magi_jax.train import build
  from magi_jax.train.step import init_state
  from magi_jax.train.trainer import split_model

  c = bouncing_tiny.get_config()
  model = build.build_model(c, build.tokenizer_for(c))       # the DiT and the text encoder
  _, params, frozen = split_model(c, model)
  _, tx = build.optimizer(c)
  state = jax.eval_shape(lambda p: init_state(p, tx, seed=0, ema=True), params)
  _strict_shardings(state)
  _strict_shardings(frozen)


@eight_devices
def test_use_mesh_sets_jax_mesh_and_flax_logical_rules():
  from flax.core import spmd as flax_spmd
  from jax.sharding import AxisType, NamedSharding

  from magi_jax.parallel.rules import current_mesh, current_rules, placement, target_platform
  mesh = make_mesh(MeshConfig(data=1, fsdp=2, context=2, tensor=2))
  assert mesh.axis_names == AXES and mesh.axis_types == (AxisType.Auto,) * 4
  assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
  assert current_mesh() is None and jax.sharding.get_abstract_mesh().empty
  x = jnp.ones((4, 8, 6))
  names = ("batch", "length", "act_embed")
  want = NamedSharding(mesh, P("fsdp", "context", None))
  rules = ShardingRules(logical=(("batch", "fsdp"), ("length", "context")))
  seen = {}

  def f(a):
    m, r = placement()
    seen.update(mesh=dict(m.shape), logical=r.logical)
    return constrain(a, names) * 2

  with use_mesh(mesh, rules):
    assert dict(current_mesh().shape) == dict(mesh.shape) and target_platform() == "cpu"
    assert current_rules().logical == rules.logical
    assert constrain(x, names).sharding.is_equivalent_to(want, 3)       # eager
    z = jax.jit(f)(x)                                                    # traced
  assert seen == {"mesh": dict(mesh.shape), "logical": rules.logical}
  assert z.sharding.is_equivalent_to(want, 3) and float(z.sum()) == 2 * x.size
  assert current_mesh() is None and flax_spmd.get_logical_axis_rules() == ()
  with jax.set_mesh(mesh):                # a bare jax.set_mesh: the default rules
    assert placement() == (jax.sharding.get_abstract_mesh(), ShardingRules())
