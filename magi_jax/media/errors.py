"""The one error type of `magi_jax.media`.

Every bad-input message names the file (when there is one) and the rule that was broken, e.g.
"prefix.mp4: video has 0 frames" or "height 270 is not divisible by 16".
"""

from __future__ import annotations

import os
import re

from magi_jax.errors import MagiError


class MediaError(MagiError, ValueError):
  """Bad media input (file, size, frame count, array) or a failed ffmpeg call."""


def media_error(path, rule: str) -> MediaError:
  """MediaError "<path>: <rule>", or just "<rule>" when there is no file."""
  if path is None:
    return MediaError(rule)
  return MediaError(f"{os.fspath(path)}: {rule}")


def _clean(line: str) -> str:
  """Drops ffmpeg's "[component @ 0x...]" prefixes."""
  return re.sub(r"\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", line).strip()


def ffmpeg_error(path, what: str, stderr: bytes) -> MediaError:
  """MediaError for a failed ffmpeg run, quoting its stderr: the first line (usually the cause)
  and the last two (the outcome)."""
  lines = []
  for line in stderr.decode("utf-8", "replace").splitlines():
    line = _clean(line)
    if line and line not in lines:
      lines.append(line)
  if len(lines) > 3:
    lines = [lines[0], "...", lines[-2], lines[-1]]
  return media_error(path, f"{what} (ffmpeg: {' | '.join(lines) or 'no message'})")
