"""The mesh from config and the sharding-rule tables (pure; one device)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from magi_jax.parallel.mesh import AXES, MeshConfig, MeshError, make_mesh, mesh_shape
from magi_jax.parallel.rules import (ShardingRules, constrain, fit_spec, path_string,
                                     tree_shardings, use_mesh)


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
