"""The directory `experiments.prepare` writes, and the rules that make it resumable.

    <out>/prepare.json                 the settings the shards were made with (refuses others)
    <out>/shards/shard-00003.array_record   the clips of shard 3 (one record per clip)
    <out>/shards/shard-00003.json      its marker: videos, clips, chunk counts, bytes, sha256,
                                       skipped videos and why; written after the shard itself
    <out>/manifest.json                every shard's marker and the totals, written by process 0
                                       once all shards are done; training reads only this

Shards are fixed by the folder alone: the sorted video names cut into runs of
`videos_per_shard`, shard s going to process s % process_count. So the shards do not depend
on how many processes or devices made them, and a re-run (after a preemption, or with another
process count) redoes exactly the shards without a valid marker: a shard whose file is missing,
or whose size or sha256 does not match its marker, is made again; a finished one is never
touched. Files appear by rename only, so a killed job leaves no half-written shard that looks
finished.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

from magi_jax.data.errors import DataError

FORMAT_VERSION = 1
SETTINGS_FILE = "prepare.json"
MANIFEST_FILE = "manifest.json"


class PrepareError(DataError):
  """A prepared directory that cannot be used or continued as asked."""


def shard_plan(videos: Sequence[str], videos_per_shard: int) -> list[list[str]]:
  """Sorted video names in runs of `videos_per_shard` (the last run may be shorter)."""
  names = sorted(videos)
  return [names[i:i + videos_per_shard] for i in range(0, len(names), videos_per_shard)]


def my_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  return list(range(process_index, num_shards, process_count))


def shard_name(s: int) -> str:
  return f"shard-{s:05d}"


def shard_path(out: str, s: int) -> str:
  return os.path.join(out, "shards", shard_name(s) + ".array_record")


def marker_path(out: str, s: int) -> str:
  return os.path.join(out, "shards", shard_name(s) + ".json")


def settings_hash(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def write_json_atomic(path: str, obj, tag: str = "") -> None:
  """Writes through a temporary file in the same directory and a rename."""
  tmp = f"{path}.tmp{tag or os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _read_json(path: str, what: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise PrepareError(f"{path}: cannot read the {what} ({e})") from None


def claim_directory(out: str, settings: dict) -> None:
  """Creates `out` for these settings, or checks that it was started with the same ones."""
  os.makedirs(os.path.join(out, "shards"), exist_ok=True)
  path = os.path.join(out, SETTINGS_FILE)
  if os.path.exists(path):
    old = _read_json(path, "settings of this prepared directory")
    if old != settings:
      diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      shown = "; ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in diff[:4])
      raise PrepareError(f"{out} was prepared with other settings ({shown}); use another output "
                         "directory or delete this one")
    return
  write_json_atomic(path, settings)


def finished_marker(out: str, s: int, settings_id: str) -> dict | None:
  """Shard s's marker when the shard is finished and intact, else None (it must be redone)."""
  mpath, spath = marker_path(out, s), shard_path(out, s)
  if not os.path.exists(mpath):
    return None
  try:
    with open(mpath, encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if marker.get("settings") != settings_id or not os.path.exists(spath):
    return None
  if os.path.getsize(spath) != marker.get("bytes") or file_sha256(spath) != marker.get("sha256"):
    return None
  return marker


def remove_leftovers(out: str, s: int) -> None:
  """Deletes what a killed writer of shard s left: its temporary files and a stale marker."""
  import glob
  for path in glob.glob(glob.escape(shard_path(out, s)) + ".tmp*"):
    os.remove(path)
  if os.path.exists(marker_path(out, s)):
    os.remove(marker_path(out, s))


def commit_shard(out: str, s: int, tmp_file: str, marker: dict) -> dict:
  """Moves a written shard into place, then writes its marker (size and sha256 added)."""
  marker = dict(marker, bytes=os.path.getsize(tmp_file), sha256=file_sha256(tmp_file))
  os.replace(tmp_file, shard_path(out, s))
  write_json_atomic(marker_path(out, s), marker)
  return marker


def write_manifest(out: str, settings: dict, markers: Sequence[dict],
                   unmatched_captions: Sequence[str] = ()) -> dict:
  """The manifest of a finished directory: settings, every shard's marker, totals, skipped
  videos with their reasons, captions.json entries that name no file."""
  skipped = [dict(v, shard=m["shard"]) for m in markers for v in m["skipped"]]
  groups: dict = {}
  for m in markers:
    for g, n in zip(m["groups"], m["chunk_counts"]):
      entry = groups.setdefault(g, {"clips": 0, "chunks": 0})
      entry["clips"] += 1
      entry["chunks"] += n
  manifest = {
      "format": FORMAT_VERSION,
      "settings": settings,
      "settings_id": settings_hash(settings),
      "shards": list(markers),
      "totals": {"shards": len(markers),
                 "videos": sum(len(m["videos"]) for m in markers),
                 "clips": sum(m["records"] for m in markers),
                 "chunks": sum(sum(m["chunk_counts"]) for m in markers),
                 "skipped": len(skipped),
                 "bytes": sum(m["bytes"] for m in markers)},
      "groups": dict(sorted(groups.items())),
      "skipped": skipped,
      "unmatched_captions": list(unmatched_captions),
  }
  write_json_atomic(os.path.join(out, MANIFEST_FILE), manifest)
  return manifest


def load_manifest(out: str) -> dict:
  """The manifest of a finished prepared directory; a clear error when it is not one."""
  path = os.path.join(out, MANIFEST_FILE)
  if not os.path.isdir(out):
    raise PrepareError(f"{out}: prepared data directory does not exist (make it with "
                       "python -m experiments.prepare)")
  if not os.path.exists(path) and not os.path.exists(os.path.join(out, SETTINGS_FILE)):
    raise PrepareError(f"{out}: not a prepared data directory (no {MANIFEST_FILE}); make it with "
                       "python -m experiments.prepare")
  if not os.path.exists(path):
    done = len([f for f in os.listdir(os.path.join(out, "shards"))
                if f.endswith(".json")]) if os.path.isdir(os.path.join(out, "shards")) else 0
    raise PrepareError(f"{out}: no {MANIFEST_FILE}, so its preparation did not finish ({done} "
                       "shard(s) done); run the same python -m experiments.prepare command again "
                       "to finish it")
  manifest = _read_json(path, "manifest")
  if manifest.get("format") != FORMAT_VERSION:
    raise PrepareError(f"{path}: format {manifest.get('format')!r}, this version reads "
                       f"{FORMAT_VERSION}; prepare the data again")
  for m in manifest["shards"]:
    spath = shard_path(out, m["shard"])
    if m["records"] and (not os.path.exists(spath) or os.path.getsize(spath) != m["bytes"]):
      raise PrepareError(f"{spath}: missing or not the {m['bytes']} bytes the manifest lists; "
                         "run experiments.prepare again to remake it")
  return manifest


def verify(out: str, manifest: dict) -> list[str]:
  """Shards whose sha256 differs from the manifest's (reads every byte)."""
  return [shard_path(out, m["shard"]) for m in manifest["shards"]
          if m["records"] and file_sha256(shard_path(out, m["shard"])) != m["sha256"]]
