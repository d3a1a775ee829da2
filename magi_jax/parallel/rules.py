"""One table maps logical axis names to mesh axes; one table maps parameter paths to logical
axes. Model code only names its activations' axes (`constrain(h, ("batch", "length",
"act_embed"))`); which devices hold what is decided here, from the config.

Parameter names are the paths of the DiT's NNX state (`layers/q/kernel`); kernels are
(in, out), and the transformer layers' parameters carry a leading layer axis (one stacked
layer, run by a scan), which is never sharded: each device holds its share of every layer. 'embed'
(the model width of a weight) goes to 'fsdp' and 'context' (ZeRO-3 over every device that holds
different tokens: at 4M tokens a 24B model's weights and AdamW moments do not fit when only 'fsdp'
splits them), attention heads and MLP columns to 'tensor'. Activation names start with `act_` where
they differ from the weight's: a weight's width is sharded over fsdp, an activation's is not (its
batch is).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("head_dim", None),
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)

# (regex searched in "a/b/c" paths, logical axes of that array); first match wins.
PARAM_RULES = (
    (r"layers/(q|k|v|qx|kx|vx)/(kernel|lora_a)$", (None, "embed", "heads")),
    (r"layers/(q|k|v|qx|kx|vx)/lora_b$", (None, None, "heads")),
    (r"layers/proj/kernel$", (None, "heads", "embed")),
    (r"layers/fc1/kernel$", (None, "embed", "mlp")),
    (r"layers/fc2/kernel$", (None, "mlp", "embed")),
    (r"layers/ada_modulate/kernel$", (None, None, "embed")),
    (r"x_embedder/kernel$", (None, "embed")),
    (r"final_linear/kernel$", ("embed", None)),
)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  logical: tuple = LOGICAL_RULES
  params: tuple = PARAM_RULES

  @classmethod
  def from_config(cls, c) -> ShardingRules:
    """From `config.sharding` (`logical`, `params`: lists of pairs);
    empty or missing -> defaults."""
    if c is None:
      return cls()
    c = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    norm = lambda v: tuple(tuple(x) if isinstance(x, list) else x for x in v)
    logical = tuple((k, norm(v) if isinstance(v, (list, tuple)) else v)
                    for k, v in (c.get("logical") or LOGICAL_RULES))
    params = tuple((k, norm(v)) for k, v in (c.get("params") or PARAM_RULES))
    for pattern, _ in params:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"config.sharding.params: bad regex {pattern!r}: {e}") from None
    return cls(logical, params)

  def spec(self, names) -> P:
    return nn.logical_to_mesh_axes(tuple(names), self.logical)

  def param_names(self, path: str, ndim: int):
    for pattern, names in self.params:
      if re.search(pattern, path) and len(names) == ndim:
        return names
    return (None,) * ndim


def axis_size(mesh, axes) -> int:
  """Devices along `axes` (None: 1); 0 when the mesh lacks one of them (nothing can split)."""
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  if any(a not in mesh.shape for a in axes):
    return 0
  return int(np.prod([mesh.shape[a] for a in axes]))


def fit_spec(spec: P, shape, mesh) -> P:
  """Drops the sharding of dims that the mesh axes do not divide (tiny models on big meshes)."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  fits = lambda i, a: axis_size(mesh, a) and shape[i] % axis_size(mesh, a) == 0
  return P(*(a if fits(i, a) else None for i, a in enumerate(spec)))


def split_axes(rules: ShardingRules, name: str, size: int, mesh):
  """The mesh axes logical axis `name` maps to, or None where they do not divide `size`."""
  return fit_spec(rules.spec((name,)), (size,), mesh)[0]


def path_string(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  if parts and parts[-1] == "value":      # an NNX Variable's array
    parts.pop()
  return "/".join(parts)


def tree_shardings(tree, mesh, rules: ShardingRules):
  """NamedShardings for every leaf of `tree` (params, optimizer state, EMA: any tree whose
  leaf paths end in the parameter paths); scalars and unmatched leaves are replicated."""
  def one(path, x):
    shape = getattr(x, "shape", ())
    names = rules.param_names(path_string(path), len(shape))
    return NamedSharding(mesh, fit_spec(rules.spec(names), shape, mesh))
  return jax.tree_util.tree_map_with_path(one, tree)


_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("magi_sharding", default=None)


@contextlib.contextmanager
def use_mesh(mesh, rules: ShardingRules = ShardingRules()):
  """Within this block, `constrain` places activations on `mesh` and the context-parallel
  attention backends split the sequence over its 'context' axis."""
  token = _ACTIVE.set((mesh, rules))
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _ACTIVE.reset(token)


def active():
  """(mesh, rules) of the innermost `use_mesh`, or None."""
  return _ACTIVE.get()


def target_platform() -> str:
  """The platform the program being traced is for: the innermost `use_mesh`'s devices (an
  ahead-of-time compile for a TPU topology runs on a CPU host), else JAX's default backend."""
  act = _ACTIVE.get()
  if act is not None:
    return act[0].devices.flat[0].platform
  return jax.default_backend()


def placement(mesh=None):
  """(mesh, rules) for code that places arrays itself (the context-parallel backends): `mesh`
  if given, else the innermost `use_mesh`'s (or None); that block's rules, else the defaults."""
  act = _ACTIVE.get()
  return (mesh if mesh is not None else act[0] if act else None,
          act[1] if act else ShardingRules())


def constrain(x, names):
  """with_sharding_constraint by logical axis names; a no-op outside `use_mesh`."""
  act = _ACTIVE.get()
  if act is None:
    return x
  mesh, rules = act
  if mesh.size == 1:
    return x
  spec = fit_spec(rules.spec(names), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
