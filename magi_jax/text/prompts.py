"""Per-chunk prompts: (prompt, chunk range) pairs -> one prompt per generated chunk.

Chunk indices count the generated (noisy) chunks from 0, whatever the prefix: with a V2V
prefix of 1 clean chunk, chunk 0 is the first new one. Ranges are half-open [start, end) and
must cover every generated chunk exactly once. A prompt file is JSON:

    [{"prompt": "a red ball rolls in", "start": 0, "end": 2},
     {"prompt": "the red ball hits the floor", "start": 2, "end": 4}]
"""

from __future__ import annotations

import dataclasses

from magi_jax.errors import MagiError
from magi_jax.json_file import read_json


class PromptScheduleError(MagiError, ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class ChunkPrompt:
  prompt: str
  start: int
  end: int


def as_schedule(prompts, num_chunks: int) -> list[ChunkPrompt]:
  """A str (all chunks), a list of ChunkPrompt / (prompt, start, end) / dicts."""
  if isinstance(prompts, str):
    return [ChunkPrompt(prompts, 0, num_chunks)]
  out = []
  for item in prompts:
    if isinstance(item, ChunkPrompt):
      out.append(item)
    elif isinstance(item, dict):
      missing = {"prompt", "start", "end"} - set(item)
      if missing:
        raise PromptScheduleError(f"prompt entry {item!r} lacks {', '.join(sorted(missing))}")
      out.append(ChunkPrompt(item["prompt"], int(item["start"]), int(item["end"])))
    else:
      prompt, start, end = item
      out.append(ChunkPrompt(prompt, int(start), int(end)))
  return out


def prompts_per_chunk(prompts, num_chunks: int) -> list[str]:
  """The prompt of each of `num_chunks` generated chunks; gaps and overlaps are errors."""
  schedule = as_schedule(prompts, num_chunks)
  owner: list[str | None] = [None] * num_chunks
  for cp in schedule:
    if not isinstance(cp.prompt, str):
      raise PromptScheduleError(f"prompt must be str, got {type(cp.prompt).__name__}")
    if not 0 <= cp.start < cp.end <= num_chunks:
      raise PromptScheduleError(f"chunk range [{cp.start}, {cp.end}) of {cp.prompt!r} is not "
                                f"inside [0, {num_chunks}) (the generated chunks)")
    for c in range(cp.start, cp.end):
      if owner[c] is not None:
        raise PromptScheduleError(f"chunk {c} has two prompts: {owner[c]!r} and {cp.prompt!r}")
      owner[c] = cp.prompt
  gaps = [c for c, p in enumerate(owner) if p is None]
  if gaps:
    raise PromptScheduleError(f"generated chunk(s) {gaps} have no prompt "
                              f"(ranges must cover [0, {num_chunks}))")
  return owner


def load_prompt_file(path: str) -> list[ChunkPrompt]:
  data = read_json(path, PromptScheduleError, "prompt file")
  if not isinstance(data, list) or not data:
    raise PromptScheduleError(f"{path}: expected a non-empty JSON list of "
                              '{"prompt", "start", "end"} entries')
  return as_schedule(data, 0)


def chunk_text_rows(encoder, prompts, null_caption, *, infer_chunk_num: int,
                    clean_chunk_num: int, special=None, flags=None):
  """`ChunkTextRows` for a prompt or a per-chunk schedule; each distinct prompt encoded once."""
  from magi_jax.text.rows import ChunkTextRows
  from magi_jax.text.special_tokens import TextFlags
  per_chunk = prompts_per_chunk(prompts, infer_chunk_num - clean_chunk_num)
  unique = list(dict.fromkeys(per_chunk))
  emb, mask = encoder.encode(unique)
  return ChunkTextRows(emb, mask, null_caption, infer_chunk_num=infer_chunk_num,
                       clean_chunk_num=clean_chunk_num, special=special,
                       flags=flags if flags is not None else TextFlags(),
                       prompt_of_chunk=[unique.index(p) for p in per_chunk])
