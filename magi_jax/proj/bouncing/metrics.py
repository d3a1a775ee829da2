"""Metrics for a generated continuation of the bouncing-shapes world vs its true future.

Why these: the world is coloured objects on a black background, so "where is the stuff" and
"how much stuff is there" are cheap, interpretable summaries that pixel MSE alone hides. MSE
rewards a blurry or blank prediction (most pixels are black), so every model number here comes
with trivial baselines computed from the clean prefix (copy the last frame, all black,
constant-velocity extrapolation): a model is only doing something if it beats them.

Conventions (pure numpy, no dependency on the world's code):
  * frames are (T, H, W, 3), uint8 or float in [0, 255];
  * a pixel is an *object* pixel when its max channel exceeds `threshold` (default 80). The
    default colours have a max channel of 200-255 and the background is 0, so 80 keeps an
    object's body and most of its anti-aliased rim while ignoring the dark haze / low-level
    noise a decoder leaves on the background (it is ~1/3 of the darkest default colour's peak);
  * a frame's centre is the intensity-weighted centroid (y, x) of its object pixels with
    weight `max channel - threshold`, so rim pixels count little and the centroid moves
    continuously as an object moves by sub-pixel amounts. With several objects it is one
    summary point of the whole scene (exact per-object tracking is not attempted);
  * a frame with no object pixel has a NaN centre; in `centre_error` a blank predicted frame
    (or an object predicted where the truth has none) costs the frame diagonal, the largest
    possible distance, so predicting nothing can never score well;
  * an *object* of a frame is a connected component (8-connected by default) of its object
    pixels with at least `min_pixels` (default 3) pixels: smaller components are speckle, the
    isolated bright pixels a decoder scatters on the background. Every object the world draws
    is larger: a ball or square of extent >= 1.5 px in the darkest default colour (green, max
    channel 200) covers at least 6 pixels above the default threshold wherever its sub-pixel
    centre lies, and the demo's objects (extent 2.5-3.5) cover about 20 or more;
  * long rollouts are scored per chunk of `frames_per_chunk` frames (`chunk_drift`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_THRESHOLD = 80.0
DEFAULT_MIN_PIXELS = 3


def _frames(frames) -> np.ndarray:
  """float64 (T, H, W, C) view of a video, validated."""
  x = np.asarray(frames)
  if x.ndim != 4:
    raise ValueError(f"frames must be (T, H, W, C), got shape {x.shape}")
  return x.astype(np.float64)


def _same_shape(pred: np.ndarray, true: np.ndarray):
  if pred.shape != true.shape:
    raise ValueError(f"pred {pred.shape} and true {true.shape} differ in shape")


def _intensity(frames) -> np.ndarray:
  """(T, H, W) max channel, float64."""
  return _frames(frames).max(axis=-1)


def bright_mask(frames, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """(T, H, W) bool: True where the pixel's max channel exceeds `threshold` (strictly)."""
  return _intensity(frames) > threshold


def centres(frames, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """(T, 2) float64 (y, x) intensity-weighted centroid of the object pixels, in pixel index
  units (pixel (i, j) sits at (i, j)); a NaN row for a frame without object pixels."""
  weight = np.maximum(_intensity(frames) - threshold, 0.0)
  T, H, W = weight.shape
  total = weight.sum(axis=(1, 2))
  ys = np.arange(H, dtype=np.float64)
  xs = np.arange(W, dtype=np.float64)
  out = np.full((T, 2), np.nan)
  has = total > 0
  out[has, 0] = (weight.sum(axis=2) @ ys)[has] / total[has]
  out[has, 1] = (weight.sum(axis=1) @ xs)[has] / total[has]
  return out


def _point_error(pred_c: np.ndarray, true_c: np.ndarray, diagonal: float) -> np.ndarray:
  """Per-row distance between two (T, 2) centre arrays with the NaN rules of `centre_error`."""
  pred_nan = np.isnan(pred_c).any(axis=1)
  true_nan = np.isnan(true_c).any(axis=1)
  dist = np.sqrt(np.sum((np.nan_to_num(pred_c) - np.nan_to_num(true_c)) ** 2, axis=1))
  dist = np.where(pred_nan != true_nan, diagonal, dist)
  return np.where(pred_nan & true_nan, 0.0, dist)


def centre_error(pred_frames, true_frames, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """(T,) float64 Euclidean distance in pixels between predicted and true centres.

  A frame where exactly one side has no object pixel costs the frame diagonal
  sqrt(H² + W²) (blank prediction, or a hallucinated object in an empty true frame); both
  empty costs 0.
  """
  pred, true = _frames(pred_frames), _frames(true_frames)
  _same_shape(pred, true)
  diagonal = float(np.hypot(pred.shape[1], pred.shape[2]))
  return _point_error(centres(pred, threshold), centres(true, threshold), diagonal)


def bright_pixel_count(frames, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """(T,) int64 number of object pixels per frame."""
  return bright_mask(frames, threshold).sum(axis=(1, 2)).astype(np.int64)


def bright_ratio(pred_frames, true_frames, threshold: float = DEFAULT_THRESHOLD) -> float:
  """mean predicted object-pixel count / mean true count (1.0 = right amount of "stuff";
  < 1 objects fade or vanish, > 1 they smear or multiply). A true video with no object pixel
  gives 1.0 if the prediction has none either, else inf."""
  p = float(bright_pixel_count(pred_frames, threshold).mean())
  t = float(bright_pixel_count(true_frames, threshold).mean())
  if t == 0.0:
    return 1.0 if p == 0.0 else float("inf")
  return p / t


def mse(pred_frames, true_frames) -> float:
  """Mean squared error with pixels scaled to [0, 1] (so the result is in [0, 1])."""
  pred, true = _frames(pred_frames), _frames(true_frames)
  _same_shape(pred, true)
  return float(np.mean(((pred - true) / 255.0) ** 2))


# ---------------------------------------------------------------------------------------------
# Baselines from the clean prefix.

def copy_last_frame(prefix, n: int) -> np.ndarray:
  """(n, H, W, C): the prefix's last frame repeated, same dtype as the prefix."""
  prefix = np.asarray(prefix)
  if prefix.ndim != 4 or prefix.shape[0] < 1:
    raise ValueError(f"prefix must be (P >= 1, H, W, C), got shape {prefix.shape}")
  return np.repeat(prefix[-1:], n, axis=0)


def blank_frames(like) -> np.ndarray:
  """All-black frames with the shape and dtype of `like`."""
  return np.zeros_like(np.asarray(like))


def constant_velocity_centres(prefix, n: int,
                              threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """(n, 2) float64: c_last + k * (c_last - c_prev), k = 1..n, from the centres of the last
  two prefix frames. A single-frame prefix or a blank second-to-last frame means velocity 0;
  a blank last frame gives NaN rows (nothing to extrapolate)."""
  prefix = _frames(prefix)
  if prefix.shape[0] < 1:
    raise ValueError("the prefix has no frame")
  c = centres(prefix[-2:], threshold)
  last = c[-1]
  velocity = c[-1] - c[0] if c.shape[0] == 2 and not np.isnan(c[0]).any() else np.zeros(2)
  k = np.arange(1, n + 1, dtype=np.float64)[:, None]
  return last[None, :] + k * velocity[None, :]


def _shift_zero_fill(frame: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """`frame` (H, W, C) moved by (dy, dx) whole pixels; what leaves the frame is lost and what
  enters is black (np.roll would wrap an object leaving one edge into the opposite edge)."""
  H, W = frame.shape[:2]
  out = np.zeros_like(frame)
  if abs(dy) >= H or abs(dx) >= W:
    return out
  src_y = slice(max(0, -dy), H - max(0, dy))
  dst_y = slice(max(0, dy), H - max(0, -dy))
  src_x = slice(max(0, -dx), W - max(0, dx))
  dst_x = slice(max(0, dx), W - max(0, -dx))
  out[dst_y, dst_x] = frame[src_y, src_x]
  return out


def constant_velocity_frames(prefix, n: int,
                             threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
  """(n, H, W, C): the last prefix frame shifted by the extrapolated displacement
  `constant_velocity_centres(...)[k] - c_last`, rounded to whole pixels, with zero fill.

  Whole-pixel shifts keep the objects sharp (a sub-pixel interpolating shift would blur them
  and change the bright-pixel count); the rounding costs at most 0.71 px of centre error. The
  baseline does not bounce: an object extrapolated out of the frame leaves it blank. A blank
  last frame gives copies of it (black frames).
  """
  prefix_arr = np.asarray(prefix)
  cv = constant_velocity_centres(prefix_arr, n, threshold)
  if n == 0 or np.isnan(cv).any():
    return copy_last_frame(prefix_arr, n)
  c_last = centres(prefix_arr[-1:], threshold)[0]
  shifts = np.rint(cv - c_last[None, :]).astype(np.int64)
  return np.stack([_shift_zero_fill(prefix_arr[-1], int(dy), int(dx)) for dy, dx in shifts])


def baseline_centre_errors(true, prefix,
                           threshold: float = DEFAULT_THRESHOLD) -> dict[str, np.ndarray]:
  """Per-frame centre errors (n,) of the two prefix baselines against the true future `true`
  (n, H, W, C): "copy_last" (`copy_last_frame` scored by `centre_error`) and "const_velocity"
  (the unrounded `constant_velocity_centres` with `centre_error`'s NaN rules: a NaN
  extrapolation, from a blank last prefix frame, costs the diagonal where the truth has an
  object)."""
  true_a, prefix_a = np.asarray(true), np.asarray(prefix)
  if prefix_a.ndim != 4 or true_a.ndim != 4 or prefix_a.shape[1:] != true_a.shape[1:]:
    raise ValueError(f"prefix {prefix_a.shape} does not match the frames {true_a.shape}")
  n = true_a.shape[0]
  diagonal = float(np.hypot(true_a.shape[1], true_a.shape[2]))
  return {
      "copy_last": centre_error(copy_last_frame(prefix_a, n), true_a, threshold),
      "const_velocity": _point_error(constant_velocity_centres(prefix_a, n, threshold),
                                     centres(true_a, threshold), diagonal),
  }


def continuation_report(pred, true, prefix,
                        threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
  """Scores a generated continuation `pred` of `prefix` against the true future `true`
  (both (n, H, W, C)), next to the baselines. All values are Python floats:

    centre_error_model / _copy_last / _const_velocity   mean px per frame (`centre_error`;
        the const-velocity baseline uses its extrapolated centres directly, unrounded)
    mse_model / _blank / _copy_last / _const_velocity   `mse` in [0, 1] pixel units
    bright_ratio_model / _copy_last                       `bright_ratio` vs the truth
  """
  pred_a, true_a, prefix_a = np.asarray(pred), np.asarray(true), np.asarray(prefix)
  _same_shape(pred_a, true_a)
  if prefix_a.ndim != 4 or prefix_a.shape[1:] != true_a.shape[1:]:
    raise ValueError(f"prefix {prefix_a.shape} does not match the frames {true_a.shape}")
  n = true_a.shape[0]
  if n == 0:
    raise ValueError("nothing to score: the true future has no frame")
  copy = copy_last_frame(prefix_a, n)
  cv_frames = constant_velocity_frames(prefix_a, n, threshold)
  base = baseline_centre_errors(true_a, prefix_a, threshold)
  return {
      "centre_error_model": float(centre_error(pred_a, true_a, threshold).mean()),
      "centre_error_copy_last": float(base["copy_last"].mean()),
      "centre_error_const_velocity": float(base["const_velocity"].mean()),
      "mse_model": mse(pred_a, true_a),
      "mse_blank": mse(blank_frames(true_a), true_a),
      "mse_copy_last": mse(copy, true_a),
      "mse_const_velocity": mse(cv_frames, true_a),
      "bright_ratio_model": bright_ratio(pred_a, true_a, threshold),
      "bright_ratio_copy_last": bright_ratio(copy, true_a, threshold),
  }


# ---------------------------------------------------------------------------------------------
# Colour control (does the video show the colour the caption asked for?).

def dominant_colour(frames, palette: Mapping[str, Sequence[float]],
                    threshold: float = DEFAULT_THRESHOLD) -> str | None:
  """The palette name that wins a per-pixel vote over all object pixels of the video (each
  object pixel votes for the palette colour nearest to it in RGB); None without object pixels.

  A vote rather than "nearest to the mean colour": the mean of a red object and a few green
  noise pixels drifts towards yellow/brown and can land on a third palette entry, while a
  vote only changes when the other colour covers more pixels. Ties go to the earlier entry.
  """
  if not palette:
    raise ValueError("empty palette")
  x = _frames(frames)
  if x.shape[-1] != 3:
    raise ValueError(f"frames must be RGB (last axis 3), got shape {x.shape}")
  return _vote(x[bright_mask(x, threshold)], palette)


def _vote(pixels: np.ndarray, palette: Mapping[str, Sequence[float]]) -> str | None:
  """`dominant_colour`'s rule on given (N, 3) pixels: nearest palette entry per pixel, the
  most votes wins, ties to the earlier entry; None for N = 0."""
  if pixels.shape[0] == 0:
    return None
  names = list(palette)
  colours = np.asarray([palette[k] for k in names], np.float64)  # (K, 3)
  d2 = ((pixels[:, None, :] - colours[None, :, :]) ** 2).sum(axis=-1)  # (N, K)
  votes = np.bincount(d2.argmin(axis=1), minlength=len(names))
  return names[int(votes.argmax())]


def text_control_accuracy(videos: Sequence, colour_names: Sequence[str],
                          palette: Mapping[str, Sequence[float]],
                          threshold: float = DEFAULT_THRESHOLD) -> float:
  """Fraction of videos whose `dominant_colour` is the requested name (None counts as wrong)."""
  if len(videos) != len(colour_names):
    raise ValueError(f"{len(videos)} videos but {len(colour_names)} colour names")
  if len(videos) == 0:
    raise ValueError("no video to score")
  hits = [dominant_colour(v, palette, threshold) == name for v, name in zip(videos, colour_names)]
  return float(np.mean(hits))


# ---------------------------------------------------------------------------------------------
# Objects and long-rollout drift (is the object still one object of its colour, chunk by chunk?).

_NEIGHBOURS = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)),
}


def component_labels(mask, connectivity: int = 8) -> np.ndarray:
  """(T, H, W) int64 connected-component labels of a (T, H, W) bool mask, per frame: every
  True pixel gets the flat index (into the whole (T, H, W) array) of its component's first
  pixel in row-major order, so labels are unique across frames; False pixels get -1.

  `connectivity` 4 joins edge neighbours, 8 also diagonal ones. Min-label propagation: each
  pass replaces a pixel's label by the smallest among itself and its neighbours, until
  nothing changes (at most as many passes as the longest path inside a component; the frames
  here are tiny).
  """
  if connectivity not in _NEIGHBOURS:
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
  m = np.asarray(mask, bool)
  if m.ndim != 3:
    raise ValueError(f"mask must be (T, H, W), got shape {m.shape}")
  T, H, W = m.shape
  none = T * H * W                    # larger than every flat index
  lab = np.where(m, np.arange(none, dtype=np.int64).reshape(T, H, W), none)
  while True:
    pad = np.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=none)
    best = lab
    for dy, dx in _NEIGHBOURS[connectivity]:
      best = np.minimum(best, pad[:, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W])
    best = np.where(m, best, none)
    if np.array_equal(best, lab):
      break
    lab = best
  return np.where(m, lab, -1)


def _objects(frames, threshold: float, min_pixels: int, connectivity: int):
  """(labels (T, H, W), per frame the list of labels of its objects: components with at least
  `min_pixels` pixels)."""
  if (isinstance(min_pixels, bool) or not isinstance(min_pixels, (int, np.integer))
      or min_pixels < 1):
    raise ValueError(f"min_pixels must be a positive integer, got {min_pixels!r}")
  mask = bright_mask(frames, threshold)
  T, H, W = mask.shape
  lab = component_labels(mask, connectivity)
  ids, sizes = np.unique(lab[mask], return_counts=True)
  per_frame = [[] for _ in range(T)]
  for i, n in zip(ids.tolist(), sizes.tolist()):
    if n >= min_pixels:
      per_frame[i // (H * W)].append(i)
  return lab, per_frame


def object_components(frames, threshold: float = DEFAULT_THRESHOLD, *,
                      min_pixels: int = DEFAULT_MIN_PIXELS, connectivity: int = 8) -> np.ndarray:
  """(T,) int64 number of objects per frame: connected components (`connectivity` 4 or 8) of
  the object pixels with at least `min_pixels` pixels (smaller ones are speckle; module
  docstring). min_pixels=1 counts every component."""
  _, per_frame = _objects(frames, threshold, min_pixels, connectivity)
  return np.asarray([len(ids) for ids in per_frame], np.int64)


def one_object_of_colour(frames, colour_name: str, palette: Mapping[str, Sequence[float]],
                         threshold: float = DEFAULT_THRESHOLD, *,
                         min_pixels: int = DEFAULT_MIN_PIXELS,
                         connectivity: int = 8) -> np.ndarray:
  """(T,) bool: the frame shows exactly one object (`object_components` == 1) and the
  `dominant_colour` vote over that object's pixels (speckle left out) is `colour_name`.

  Only count and colour are checked: a smeared or grown object still passes (the centre error
  and `bright_ratio` measure those). ValueError when `colour_name` is not in the palette.
  """
  if colour_name not in palette:
    raise ValueError(f"colour {colour_name!r} is not in the palette {list(palette)}")
  x = _frames(frames)
  if x.shape[-1] != 3:
    raise ValueError(f"frames must be RGB (last axis 3), got shape {x.shape}")
  lab, per_frame = _objects(x, threshold, min_pixels, connectivity)
  out = np.zeros(x.shape[0], bool)
  for t, ids in enumerate(per_frame):
    if len(ids) == 1:
      out[t] = _vote(x[t][lab[t] == ids[0]], palette) == colour_name
  return out


def chunk_means(per_frame, frames_per_chunk: int) -> np.ndarray:
  """(T / frames_per_chunk,) float64 mean of a (T,) per-frame series over each chunk of
  `frames_per_chunk` consecutive frames; ValueError unless T is a positive multiple."""
  v = np.asarray(per_frame, np.float64)
  F = frames_per_chunk
  if isinstance(F, bool) or not isinstance(F, (int, np.integer)) or F < 1:
    raise ValueError(f"frames_per_chunk must be a positive integer, got {F!r}")
  if v.ndim != 1 or v.shape[0] == 0 or v.shape[0] % F:
    raise ValueError(f"{v.shape} frames are not a positive whole number of chunks of {F}")
  return v.reshape(-1, F).mean(axis=1)


def chunk_drift(pred, true, frames_per_chunk: int, *, palette: Mapping[str, Sequence[float]],
                colour_name: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                min_pixels: int = DEFAULT_MIN_PIXELS,
                connectivity: int = 8) -> dict[str, np.ndarray]:
  """Per-chunk drift of a generated video `pred` against the true one `true` (both (T, H, W, 3),
  T a multiple of `frames_per_chunk`; chunk k is frames [kF, (k+1)F)). Returns arrays of one
  entry per chunk:

    centre_error       float64 mean px per frame of `centre_error` (a blank predicted frame,
                       or an object where the truth has none, costs the frame diagonal)
    one_object         bool: `one_object_of_colour` holds in *every* frame of the chunk (the
                       truth of a single-object world does in every frame, so one split,
                       vanished or recoloured frame is a real failure; a majority rule would
                       hide an object that flickers apart)
    one_object_frames  float64 fraction of the chunk's frames where it holds

  `colour_name`: the colour the object must keep; None takes the truth's `dominant_colour`
  (ValueError when the truth shows no object).
  """
  pred_a, true_a = _frames(pred), _frames(true)
  _same_shape(pred_a, true_a)
  if colour_name is None:
    colour_name = dominant_colour(true_a, palette, threshold)
    if colour_name is None:
      raise ValueError("the true video shows no object: pass colour_name")
  ok = one_object_of_colour(pred_a, colour_name, palette, threshold, min_pixels=min_pixels,
                            connectivity=connectivity)
  frac = chunk_means(ok, frames_per_chunk)
  return {
      "centre_error": chunk_means(centre_error(pred_a, true_a, threshold), frames_per_chunk),
      "one_object": frac == 1.0,
      "one_object_frames": frac,
  }
