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

Every parameter of rank >= 2 should match an entry of the parameter table, one that names its
axes or one that replicates it on purpose (logical axes `REPLICATED`): `tree_shardings` warns
about the others (once per path) and replicates them, or raises `ShardingRuleError` when the
rules are `strict` (`config.sharding.strict`).

Where the current mesh and rules live: `use_mesh` sets the mesh with `jax.set_mesh` and the
logical table with flax's `nnx.logical_axis_rules` (JAX has no place for logical-axis rules;
flax's is the one NNX's own sharding annotations read). Inside a trace JAX exposes only the
abstract mesh (`jax.sharding.get_abstract_mesh()`); the kernels' `shard_map`s and the
activation constraints are built on the concrete mesh `use_mesh` was given, which this module
keeps for the block (one context variable), so eager calls between jitted steps (the
sampler's loop) place their arrays on real devices. Under a bare `jax.set_mesh` the abstract
mesh is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import warnings

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import NamedSharding, PartitionSpec as P

from magi_jax.errors import MagiError

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

# The logical axes of a parameter table entry that replicates a parameter of any rank on purpose.
REPLICATED = None

# (regex searched in "a/b/c" paths, logical axes of that array); first match wins.
PARAM_RULES = (
    (r"layers/(q|k|v|qx|kx|vx)/(kernel|lora_a)$", (None, "embed", "heads")),
    (r"layers/(q|k|v|qx|kx|vx)/lora_b$", (None, None, "heads")),
    (r"layers/proj/kernel$", (None, "heads", "embed")),
    (r"layers/fc1/kernel$", (None, "embed", "mlp")),
    (r"layers/fc2/kernel$", (None, "mlp", "embed")),
    # LoRA adapters (in, r) / (r, out): split like their base kernel's in / out axis.
    (r"layers/proj/lora_a$", (None, "heads", None)),
    (r"layers/fc1/lora_a$", (None, "embed", None)),
    (r"layers/fc2/lora_a$", (None, "mlp", None)),
    (r"layers/fc1/lora_b$", (None, None, "mlp")),
    (r"layers/(proj|fc2|ada_modulate)/lora_b$", (None, None, "embed")),
    (r"layers/ada_modulate/lora_a$", (None, None, None)),
    # int8 weights' per-channel scales (L, 1, out): split like their kernel's out axis.
    (r"layers/(q|k|v|qx|kx|vx)/qscale$", (None, None, "heads")),
    (r"layers/fc1/qscale$", (None, None, "mlp")),
    (r"layers/(proj|fc2|ada_modulate)/qscale$", (None, None, "embed")),
    (r"layers/ada_modulate/kernel$", (None, None, "embed")),
    (r"x_embedder/kernel$", (None, "embed")),
    (r"y_embedder/y_proj_xattn/kernel$", (None, "embed")),
    (r"final_linear/kernel$", ("embed", None)),
    # Replicated on purpose. The stacked layers' vectors (norm weights and biases, linear
    # biases: one row per layer) and the conditioning embedders (timestep MLP, caption
    # adaLN projection, null caption): together under 0.1% of the weights.
    (r"layers/[^/]+/(weight|bias)$", (None, None)),
    (r"t_embedder/fc(1|2)/kernel$", REPLICATED),
    (r"y_embedder/(y_proj_adaln/kernel|null_caption_embedding)$", REPLICATED),
    # The bouncing-shapes demo's own small text encoder (magi_jax/proj/bouncing), trained
    # beside the DiT: a few 64-wide layers.
    (r"text_encoder/", REPLICATED),
)


class ShardingRuleError(MagiError, ValueError):
  """A parameter the rules do not place (strict rules), or a bad rule table."""


class UnplacedParameterWarning(UserWarning):
  """A parameter of rank >= 2 that no entry of the parameter table matches (replicated)."""


def logical_to_mesh_axes(names, logical) -> P:
  """PartitionSpec for an array whose dims carry logical `names`, by the `logical` table.

  Entries are taken in order: an entry applies to the dim of its logical name when that dim
  has no mesh axes yet and none of the entry's mesh axes is used by another dim. Names no
  entry maps (and None) give unsharded dims.
  """
  names = tuple(names)
  repeated = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
  if repeated:
    raise ShardingRuleError(f"logical axes {repeated} name more than one dim of {names}")
  out: list = [None] * len(names)
  decided = [False] * len(names)
  used: set[str] = set()
  for logical_name, mesh_axes in logical:
    if logical_name not in names:
      continue
    i = names.index(logical_name)
    axes = {mesh_axes} if isinstance(mesh_axes, str) else set(mesh_axes or ())
    if decided[i] or axes & used:
      continue
    out[i], decided[i] = mesh_axes, True
    used |= axes
  return P(*out)


def _pairs(value, what: str) -> tuple:
  """A config list of [name, axes] pairs -> a tuple of (name, axes) with lists as tuples."""
  as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  out = []
  for pair in value:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise ShardingRuleError(f"config.sharding.{what}: each entry is a pair, got {pair!r}")
    k, v = pair
    out.append((k, tuple(as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """logical: (logical name, mesh axes) pairs; params: (path regex, logical axes per dim, or
  REPLICATED) pairs, first match wins; strict: an unmatched parameter of rank >= 2 raises
  instead of being replicated with a warning."""
  logical: tuple = LOGICAL_RULES
  params: tuple = PARAM_RULES
  strict: bool = False

  @classmethod
  def from_config(cls, c) -> ShardingRules:
    """From `config.sharding` (`logical`, `params`: lists of pairs; `strict`: bool);
    empty or missing tables -> the defaults."""
    if c is None:
      return cls()
    c = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    logical = _pairs(c.get("logical") or LOGICAL_RULES, "logical")
    params = _pairs(c.get("params") or PARAM_RULES, "params")
    for pattern, _ in params:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ShardingRuleError(f"config.sharding.params: bad regex {pattern!r}: {e}") from None
    strict = c.get("strict", False)
    if not isinstance(strict, bool):
      raise ShardingRuleError(f"config.sharding.strict must be true or false, got {strict!r}")
    return cls(logical, params, strict)

  def spec(self, names) -> P:
    return logical_to_mesh_axes(names, self.logical)

  def match(self, path: str, ndim: int):
    """The logical axes of the first entry matching `path` with `ndim` axes (a REPLICATED
    entry matches any rank), or None when none does."""
    for pattern, names in self.params:
      if re.search(pattern, path) and (names is REPLICATED or len(names) == ndim):
        return (None,) * ndim if names is REPLICATED else tuple(names)
    return None

  def param_names(self, path: str, ndim: int):
    """`match`, with an unmatched parameter replicated."""
    names = self.match(path, ndim)
    return (None,) * ndim if names is None else names


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


_WARNED: set[str] = set()


def _unplaced(found: list[tuple[str, tuple]], rules: ShardingRules) -> None:
  """Raises (strict rules) or warns once per path about parameters no entry matches."""
  listing = lambda items: ", ".join(f"{p} {tuple(s)}" for p, s in items[:8]) + (
      f" and {len(items) - 8} more" if len(items) > 8 else "")
  advice = ("add an entry (regex, logical axes per dim) for each to config.sharding.params, "
            "or (regex, None) to replicate it on purpose")
  if rules.strict:
    raise ShardingRuleError(f"no sharding rule matches {len(found)} parameter(s) of rank >= 2: "
                            f"{listing(found)}; {advice} (config.sharding.strict is on)")
  new = [(p, s) for p, s in found if p not in _WARNED]
  if new:
    _WARNED.update(p for p, _ in new)
    warnings.warn(f"no sharding rule matches {len(new)} parameter(s) of rank >= 2, replicated "
                  f"on every device: {listing(new)}; {advice}", UnplacedParameterWarning,
                  stacklevel=3)


def tree_shardings(tree, mesh, rules: ShardingRules):
  """NamedShardings for every leaf of `tree` (params, optimizer state, EMA: any tree whose
  leaf paths end in the parameter paths), by the parameter table. Scalars, vectors and
  unmatched leaves are replicated; an unmatched leaf of rank >= 2 warns, or raises
  ShardingRuleError under strict rules."""
  unplaced = []

  def one(path, x):
    shape = getattr(x, "shape", ())
    name = path_string(path)
    names = rules.match(name, len(shape))
    if names is None:
      if len(shape) >= 2:
        unplaced.append((name, shape))
      names = (None,) * len(shape)
    return NamedSharding(mesh, fit_spec(rules.spec(names), shape, mesh))

  out = jax.tree_util.tree_map_with_path(one, tree)
  if unplaced:
    _unplaced(unplaced, rules)
  return out


_CONCRETE: contextvars.ContextVar = contextvars.ContextVar("magi_concrete_mesh", default=None)


def current_mesh():
  """The concrete mesh of the innermost `use_mesh`; else that of a bare `jax.set_mesh` as JAX's
  abstract mesh; None outside both (`jax.shard_map`, sharding constraints and `axis_size` take
  either kind)."""
  abstract = jax.sharding.get_abstract_mesh()
  if abstract.empty:
    return None
  mesh = _CONCRETE.get()
  return mesh if mesh is not None and mesh.abstract_mesh == abstract else abstract


def current_rules() -> ShardingRules:
  """ShardingRules with the logical table of the innermost `use_mesh` (flax's logical-axis
  rules context); the default table where none is set or it is empty (as `from_config` reads
  an empty one); the default parameter table."""
  logical = tuple(flax_spmd.get_logical_axis_rules())
  return ShardingRules(logical=logical) if logical else ShardingRules()


@contextlib.contextmanager
def use_mesh(mesh, rules: ShardingRules = ShardingRules()):
  """Within this block, `constrain` places activations on `mesh` and the context-parallel
  attention backends split the sequence over its 'context' axis: `jax.set_mesh(mesh)` and
  flax's `nnx.logical_axis_rules(rules.logical)`."""
  token = _CONCRETE.set(mesh)
  try:
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules.logical):
      yield mesh
  finally:
    _CONCRETE.reset(token)


def target_platform() -> str:
  """The platform the program being traced is for: the current mesh's devices (an
  ahead-of-time compile for a TPU topology runs on a CPU host), else JAX's default backend."""
  mesh = current_mesh()
  abstract = getattr(mesh, "abstract_mesh", mesh)        # a concrete Mesh has one
  device = None if abstract is None else abstract.abstract_device
  return device.platform if device is not None else jax.default_backend()


def placement(mesh=None):
  """(mesh, rules) for code that places arrays itself (the context-parallel backends): `mesh`
  if given, else the current one (`current_mesh`, or None); the current rules."""
  return (mesh if mesh is not None else current_mesh()), current_rules()


def constrain(x, names):
  """with_sharding_constraint by logical axis names; a no-op outside a mesh."""
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return x
  spec = fit_spec(current_rules().spec(names), x.shape, mesh)
  if not isinstance(x, jax.core.Tracer):
    # A concrete array outside a trace needs its sharding on concrete devices: the mesh
    # jax.set_mesh holds, which `get_mesh` gives outside a trace only (inside one, a constant
    # array is constrained in the traced program, on the abstract mesh).
    with contextlib.suppress(ValueError):
      mesh = jax.sharding.get_mesh()
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
