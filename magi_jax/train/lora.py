"""LoRA adapters on the DiT's linear maps: fine-tune a few million parameters of a multi-billion
parameter model, store them apart from the base checkpoint, and fold them back in for sampling.

Why this shape:

* Parameter paths. `LoRALinear` is a `Linear` that holds the *same* `kernel` / `bias`
  `nnx.Param` objects under the *same* attribute names, and adds `lora_a` / `lora_b`
  (`nnx.LoRAParam`) next to them. So every base weight keeps its path in the adapted model
  (`layers.q.kernel` stays `layers.q.kernel`) and the adapters are the only new leaves
  (`layers.q.lora_a`, `layers.q.lora_b`). No path mapping is needed: the official
  exporter (`official_state_dict`) of an adapted model writes exactly the base checkpoint,
  `nnx.update(adapted, base_state)` works, and the usual flow is "strict-load the base
  checkpoint, then `apply_lora` / `load_lora`".
* Stacked layers. The DiT holds its layers as one stacked `TransformerLayer` (every parameter
  has a leading layer axis, magi_jax/models/stack.py), so one `LoRALinear` per target serves
  every layer: kernel (L, in, out), lora_a (L, in, r), lora_b (L, r, out); the scan over
  layers hands each layer its own slices.
* Numerics. y = x·W (+ b) + (x·A)·B · alpha/r, everything accumulated in float32 and rounded
  once to `out_dtype`. B starts at zero, so an adapted model is bitwise the base model until
  it is trained. Adapters are float32 by default even on a bf16 base (training stability).
* Training only the adapters. `nnx.LoRAParam` is a subclass of `nnx.Param`, so the filter
  `nnx.LoRAParam` selects exactly the adapters (for `nnx.Optimizer(..., wrt=)`,
  `nnx.DiffState`, `split_trainable`), while `nnx.Param` still means "everything".
* File format. One safetensors file (the repo's own reader/writer, which gives clear errors on
  truncated files) holding only the adapters, one tensor per layer under per-layer names
  ("layers.0.q.lora_a" (in, r): unstacked on save, stacked on load), with rank / alpha /
  targets / layer count in the safetensors `__metadata__`. One file means the configuration
  can never get separated from the tensors it describes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from magi_jax.errors import MagiError
from magi_jax.formats.safetensors_io import (CheckpointFormatError, SafetensorsFile,
                                             save_safetensors)
from magi_jax.models.block import TransformerLayer
from magi_jax.models.dit import VideoDiT
from magi_jax.models.layers import Linear

F32 = jnp.float32
DEFAULT_TARGETS = ("q", "k", "v", "qx", "kx", "vx", "proj", "fc1", "fc2")
FILE_FORMAT = "magi_jax.lora"
FILE_VERSION = "1"


class LoRAError(MagiError, ValueError):
  """A bad LoRA configuration, or an adapter file that is unreadable or does not fit."""


class LoRALinear(Linear):
  """A `Linear` plus a low-rank update; drop-in for the wrapped layer (same call signature).

  `kernel` and `bias` are the wrapped layer's own `nnx.Param`s (not copies), so their paths
  and values are the base weights'. `lora_a` (in, r) starts N(0, 1/in), `lora_b` (r, out)
  starts at zero. A stacked base (kernel (L, in, out)) gets stacked adapters (L, in, r) and
  (L, r, out); calls and `delta` then take one layer's slice (the layer scan's), while
  `merged_kernel` works on either.
  """

  def __init__(self, base: Linear, *, rank: int, alpha: float, rngs: nnx.Rngs, dtype=F32):
    shape = base.kernel.get_value().shape
    lead, (d_in, d_out) = tuple(shape[:-2]), shape[-2:]
    self.kernel = base.kernel
    self.bias = base.bias
    self.rank = int(rank)
    self.alpha = float(alpha)
    self.scale = self.alpha / self.rank
    a = jax.random.normal(rngs.params(), lead + (d_in, self.rank), F32) * d_in ** -0.5
    self.lora_a = nnx.LoRAParam(a.astype(dtype))
    self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (self.rank, d_out), dtype))

  def delta(self, x, *, precision=None):
    """(x·A)·B·scale in float32 (x·A is kept in float32, not rounded)."""
    a = self.lora_a[...]
    dtype = jnp.promote_types(x.dtype, a.dtype)
    xa = jnp.dot(x.astype(dtype), a.astype(dtype), precision=precision,
                 preferred_element_type=F32)
    xab = jnp.dot(xa, self.lora_b[...].astype(F32), precision=precision,
                  preferred_element_type=F32)
    return xab * jnp.asarray(self.scale, F32)

  def __call__(self, x, *, out_dtype, precision=None):
    y = super().__call__(x, out_dtype=F32, precision=precision)   # base, float32, unrounded
    return (y + self.delta(x, precision=precision)).astype(out_dtype)

  def merged_kernel(self, scale: float = 1.0):
    """W + A·B·(alpha / rank)·scale in the kernel's dtype (formed in float32, rounded once);
    per layer when stacked."""
    w = self.kernel[...]
    ab = jnp.matmul(self.lora_a[...].astype(F32), self.lora_b[...].astype(F32),
                    precision=jax.lax.Precision.HIGHEST)
    return (w.astype(F32) + ab * (self.scale * scale)).astype(w.dtype)


# ---------------------------------------------------------------------------------------------
# Walking the model

def _stack(model) -> TransformerLayer:
  """The model's stacked TransformerLayer (leading layer axis on every parameter)."""
  layers = getattr(model, "layers", None)
  if not isinstance(layers, TransformerLayer):
    raise LoRAError(f"{type(model).__name__} has no stacked `layers` TransformerLayer; LoRA "
                    "applies to a VideoDiT")
  return layers


def _num_layers(model) -> int:
  return int(_stack(model).ada_modulate.kernel.get_value().shape[0])


def _linear_names(layer) -> list[str]:
  return [n for n, v in vars(layer).items() if isinstance(v, Linear)]


def _adapters(model) -> dict[str, LoRALinear]:
  """Target attribute name -> its (stacked) LoRALinear, in a fixed order: DEFAULT_TARGETS'
  order, then any other adapted map by name (a stacked module lists its attributes sorted)."""
  found = {n: v for n, v in vars(_stack(model)).items() if isinstance(v, LoRALinear)}
  order = lambda n: ((DEFAULT_TARGETS.index(n), "") if n in DEFAULT_TARGETS
                     else (len(DEFAULT_TARGETS), n))
  return {n: found[n] for n in sorted(found, key=order)}


def _key(i: int, name: str) -> str:
  """Layer i's adapter name prefix, as stored in the file ("layers.0.q")."""
  return f"layers.{i}.{name}"


def _check_config(rank, alpha, targets) -> tuple[str, ...]:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
    raise LoRAError(f"LoRA rank must be a positive integer, got {rank!r}")
  if not isinstance(alpha, (int, float, np.number)) or not math.isfinite(float(alpha)):
    raise LoRAError(f"LoRA alpha must be a finite number, got {alpha!r}")
  if isinstance(targets, str):
    targets = (targets,)
  targets = tuple(targets)
  if not targets:
    raise LoRAError("LoRA targets are empty")
  dup = sorted({t for t in targets if targets.count(t) > 1})
  if dup:
    raise LoRAError(f"LoRA targets repeat {dup}")
  return targets


def _check_targets(model, targets) -> None:
  """Every target is a plain (not yet adapted) Linear of the layers; raises naming the bad one."""
  layer = _stack(model)
  for name in targets:
    mod = getattr(layer, name, None)
    if isinstance(mod, LoRALinear):
      raise LoRAError(f"{_key(0, name)} already has a LoRA adapter, as has that map in every "
                      "layer (merge_lora first, or load the adapters into a fresh base model)")
    if not isinstance(mod, Linear):
      what = "missing" if mod is None else f"a {type(mod).__name__}"
      raise LoRAError(f"LoRA target {name!r} is not a Linear in TransformerLayer (it is {what}); "
                      f"the layer's Linear maps are {_linear_names(layer)}")


def lora_config(model) -> tuple[int, float, tuple[str, ...]] | None:
  """(rank, alpha, targets) of an adapted model, or None when it has no adapters."""
  adapters = _adapters(model)
  if not adapters:
    return None
  first = next(iter(adapters.values()))
  for n, m in adapters.items():
    if (m.rank, m.alpha) != (first.rank, first.alpha):
      raise LoRAError(f"layers.*.{n} has rank {m.rank} / alpha {m.alpha}, others rank "
                      f"{first.rank} / alpha {first.alpha}: mixed LoRA configurations")
  return first.rank, first.alpha, tuple(adapters)


# ---------------------------------------------------------------------------------------------
# Public API

def apply_lora(model: VideoDiT, *, rank: int, alpha: float,
               targets: Sequence[str] = DEFAULT_TARGETS, rngs: nnx.Rngs, dtype=F32) -> VideoDiT:
  """Replaces `targets` of the (stacked) TransformerLayer by `LoRALinear`s, in place, so every
  layer gets its own adapters; returns `model`.

  Everything is validated before anything changes, so a bad call leaves the model as it was.
  """
  targets = _check_config(rank, alpha, targets)
  _check_targets(model, targets)
  layer = _stack(model)
  for name in targets:
    setattr(layer, name, LoRALinear(getattr(layer, name), rank=int(rank), alpha=float(alpha),
                                    rngs=rngs, dtype=dtype))
  return model


def lora_state(model) -> nnx.State:
  """Only the adapters (`nnx.LoRAParam` leaves), under their model paths."""
  return nnx.state(model, nnx.LoRAParam)


def split_trainable(model, lora: bool):
  """(graphdef, trainable, frozen) for a functional training step inside `jax.jit`.

  `lora=True`: trainable = the adapters, frozen = every other variable (base weights).
  `lora=False`: trainable = every `nnx.Param` (adapters included), frozen = the rest.
  `nnx.merge(graphdef, trainable, frozen)` rebuilds the model.
  """
  if lora and not _adapters(model):
    raise LoRAError("split_trainable(lora=True) on a model without adapters (apply_lora first)")
  return nnx.split(model, nnx.LoRAParam if lora else nnx.Param, ...)


def merge_lora(model: VideoDiT, scale: float = 1.0) -> VideoDiT:
  """A new plain VideoDiT (Linear layers again) with kernels W + A·B·(alpha / rank)·scale
  (`scale` weakens or strengthens the adapters' update; 1 is the trained one).

  The adapted model is left unchanged; unadapted weights are shared (not copied).
  """
  adapters = _adapters(model)
  if not adapters:
    raise LoRAError("merge_lora: the model has no LoRA adapters")
  merged = {("layers", n, "kernel"): m.merged_kernel(scale) for n, m in adapters.items()}
  source = {path: var.get_value() for path, var in
            nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))}
  abstract = nnx.eval_shape(lambda: type(model)(model.cfg, precision=model.precision,
                                                distill=model.distill, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  targets = dict(nnx.to_flat_state(state))
  if set(targets) != set(source):
    raise LoRAError("merge_lora: the model's base parameters do not match a fresh "
                    f"{type(model).__name__} (differing paths: "
                    f"{sorted(map(str, set(targets) ^ set(source)))[:5]})")
  for path, var in targets.items():
    var.set_value(merged.get(path, source[path]))
  return nnx.merge(graphdef, state)


def save_lora(path: str | os.PathLike, model, *, rank: int | None = None,
              alpha: float | None = None, targets: Sequence[str] | None = None) -> None:
  """Writes the adapters (only) to one safetensors file; rank/alpha/targets go in its metadata.

  rank / alpha / targets are read from the model; when given they must agree with it.
  """
  cfg = lora_config(model)
  if cfg is None:
    raise LoRAError("save_lora: the model has no LoRA adapters (apply_lora first)")
  m_rank, m_alpha, m_targets = cfg
  for what, given, have in (("rank", rank, m_rank), ("alpha", alpha, m_alpha)):
    if given is not None and float(given) != float(have):
      raise LoRAError(f"save_lora: {what}={given!r} but the model's adapters have {what} {have}")
  if targets is not None and set(_check_config(m_rank, m_alpha, targets)) != set(m_targets):
    raise LoRAError(f"save_lora: targets {list(targets)} but the model's adapters are on "
                    f"{list(m_targets)}")
  tensors = {}
  for n, m in _adapters(model).items():
    for leaf in ("lora_a", "lora_b"):
      stacked = np.asarray(jax.device_get(getattr(m, leaf)[...]))
      for i, one in enumerate(stacked):           # per-layer names, as the format has them
        tensors[f"{_key(i, n)}.{leaf}"] = one
  meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "rank": str(m_rank),
          "alpha": repr(m_alpha), "targets": json.dumps(list(m_targets)),
          "num_layers": str(_num_layers(model))}
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_safetensors(tensors, path, metadata=meta)


def _read_file(path: str):
  """-> (SafetensorsFile, rank, alpha, targets); LoRAError naming the file on any problem."""
  try:
    f = SafetensorsFile(path)
  except (CheckpointFormatError, OSError, ValueError, KeyError, TypeError) as e:
    raise LoRAError(f"cannot read LoRA adapter file {path}: {e}") from e
  meta = f.metadata
  if meta.get("format") != FILE_FORMAT:
    raise LoRAError(f"{path} is not a LoRA adapter file of this project (its safetensors "
                    f"metadata has no format={FILE_FORMAT!r})")
  if meta.get("version") != FILE_VERSION:
    raise LoRAError(f"{path}: LoRA file version {meta.get('version')!r}, this code reads "
                    f"{FILE_VERSION!r}")
  try:
    rank, alpha = int(meta["rank"]), float(meta["alpha"])
    targets = _check_config(rank, alpha, json.loads(meta["targets"]))
  except (KeyError, ValueError, TypeError) as e:
    raise LoRAError(f"{path}: corrupt LoRA metadata {meta} ({e})") from e
  return f, rank, alpha, targets


def load_lora(path: str | os.PathLike, model: VideoDiT) -> VideoDiT:
  """Loads adapters saved by `save_lora` into `model` (in place) and returns it.

  A plain base model gets adapters with the file's rank / alpha / targets first; an adapted
  one must have the same configuration. Everything is checked before the model changes:
  configuration, then missing / unexpected keys and shapes, all reported in one error.
  """
  path = os.fspath(path)
  f, rank, alpha, targets = _read_file(path)
  cfg = lora_config(model)
  if cfg is None:
    _check_targets(model, targets)
  else:
    m_rank, m_alpha, m_targets = cfg
    if m_rank != rank:
      raise LoRAError(f"{path}: rank mismatch: the file has rank {rank}, the model's adapters "
                      f"rank {m_rank}")
    if set(m_targets) != set(targets):
      raise LoRAError(f"{path}: targets mismatch: the file has {list(targets)}, the model's "
                      f"adapters are on {list(m_targets)}")
    if m_alpha != alpha:
      raise LoRAError(f"{path}: alpha mismatch: the file has alpha {alpha}, the model's "
                      f"adapters alpha {m_alpha}")

  expected = {}
  layer, n_layers = _stack(model), _num_layers(model)
  for i in range(n_layers):
    for n in targets:
      d_in, d_out = getattr(layer, n).kernel.get_value().shape[-2:]
      expected[f"{_key(i, n)}.lora_a"] = (d_in, rank)
      expected[f"{_key(i, n)}.lora_b"] = (rank, d_out)
  keys = set(f.keys())
  missing = sorted(set(expected) - keys)
  unexpected = sorted(keys - set(expected))
  misshaped = [f"{k}: file {f.shape(k)}, expected {expected[k]}"
               for k in sorted(keys & set(expected)) if f.shape(k) != expected[k]]
  if missing or unexpected or misshaped:
    lines = [f"{path}: the LoRA adapters do not match the model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        lines.append(f"  {len(items)} {title}: " + "; ".join(shown))
    raise LoRAError("\n".join(lines))

  values = {k: np.array(f.get(k)) for k in sorted(expected)}
  if cfg is None:
    dtype = next(iter(values.values())).dtype
    apply_lora(model, rank=rank, alpha=alpha, targets=targets, rngs=nnx.Rngs(0), dtype=dtype)
  for n, m in _adapters(model).items():
    for leaf in ("lora_a", "lora_b"):
      var = getattr(m, leaf)
      stacked = np.stack([values[f"{_key(i, n)}.{leaf}"] for i in range(n_layers)])
      var.set_value(jnp.asarray(stacked, var.get_value().dtype))
  return model
