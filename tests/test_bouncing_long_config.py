"""experiments/configs/bouncing_long.py is the main job's config with only the fields its
docstring names changed (so its measured result is the main job's recipe trained longer), and
its smoke variant is the main job's."""

import pytest

from experiments.configs import bouncing_long, bouncing_tiny


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k not in ("overrides", "world"):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def test_only_the_documented_fields_differ():
  long = _flat(bouncing_long.get_config().to_dict())
  tiny = _flat(bouncing_tiny.get_config().to_dict())
  assert set(long) == set(tiny)
  changed = {k for k in long if long[k] != tiny[k]}
  assert changed == {"total_steps", "data.train_episodes"}
  assert long["total_steps"] > tiny["total_steps"]       # the same recipe, more updates
  assert long["data.train_episodes"] > tiny["data.train_episodes"]


def test_smoke_is_the_main_jobs_smoke_and_bad_variants_are_named():
  assert bouncing_long.get_config("smoke").to_dict() == bouncing_tiny.get_config("smoke").to_dict()
  with pytest.raises(ValueError, match="unknown config variant 'x'"):
    bouncing_long.get_config("x")
