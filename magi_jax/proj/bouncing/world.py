"""Bouncing shapes: a tiny procedurally generated physics world with captions, in pure numpy.

Why it exists: a training run needs a data set whose ground truth is known exactly, is cheap to
make in any quantity, and has text that controls what happens. Every episode is a pure function
of (WorldConfig, seed): one to four coloured balls or squares fly under gravity, bounce off the
walls and off each other, and are drawn anti-aliased so sub-pixel motion is visible. The caption
names the objects ("a red ball and a blue square"); each chunk's caption adds what happens in
that chunk ("...; the red ball hits the floor, the blue square flies"), so colour words and
event words can be checked in generated videos.

Coordinates: (y, x) in pixel-index units, y pointing down. Pixel (i, j) is the unit square
centred on (i, j), so the frame spans [-0.5, H - 0.5] x [-0.5, W - 0.5] and the intensity
centroid of a drawn object is its centre. An object's extent `r` is a ball's radius or a
square's half side; squares stay axis-aligned (no rotation, no friction).

Physics per frame, in `substeps` equal steps of dt = 1 / substeps frames:
  1. exact constant-acceleration motion: p += v dt + g dt^2 / 2, v += g dt (gravity +y), per
     axis (the walls are axis-aligned, so the axes are independent);
  2. walls, solved exactly within the step: at the time of impact (a root of the motion's
     quadratic) the normal velocity u becomes -e u (e = restitution; 1.0 is elastic) and the
     motion continues for the rest of the step, so with e = 1 energy is conserved exactly;
  3. object pairs: contact normal and depth (ball-ball along the centres, square-square along
     the axis of least overlap, ball-square towards the square's closest point); approaching
     pairs exchange the impulse of a collision with restitution e, and the overlap is removed
     in inverse proportion to mass. Mass is area (density 1): pi r^2 for a ball, 4 r^2 for a
     square, so with e = 1 momentum and kinetic energy are conserved exactly.
A wall hit or a collision is an *event* when its normal speed is at least `event_speed` px/frame
(this keeps the micro-bounces of an object resting on the floor silent). An event at time s
(in frames) belongs to frame floor(s + 1/2) and so to chunk floor(s + 1/2) // frames_per_chunk.

Caption grammar (all lowercase):
  caption       = "a red ball" | "a red ball and a blue square" | "a X, a Y and a Z" ...
                  ("an" before a colour starting with a vowel)
  chunk caption = f"{caption}; {', '.join(events)}", where the chunk's events, in time order
                  without repeats, are "the red ball hits the floor" (also "the ceiling",
                  "the left wall", "the right wall"), "the red ball collides with the blue
                  square" (lower object index first), followed for every object without an
                  event in the chunk by "the red ball rolls" (touching the floor on every frame
                  of the chunk) or "the red ball flies".
`caption_words` splits any caption into the words `vocabulary` lists.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SHAPES = ("ball", "square")
WALLS = ("ceiling", "floor", "left wall", "right wall")   # -y, +y, -x, +x
DEFAULT_COLOURS = (("red", (230, 40, 40)), ("green", (40, 200, 40)), ("blue", (60, 90, 255)),
                   ("yellow", (230, 220, 40)))
# Caption words that do not depend on the config (colour and shape words are added).
_GRAMMAR_WORDS = ("a", "an", "and", "the", "hits", "floor", "ceiling", "left", "right", "wall",
                  "collides", "with", "flies", "rolls")
_ROLL_TOLERANCE = 0.25      # px: "touching the floor" for the rolls phrase
_MAX_FILL = 0.35            # bounding boxes of all objects may cover at most this frame fraction
_PLACEMENT_TRIES = 1000


def caption_words(text: str) -> list[str]:
  """The words of a caption: lowercased, ';' ',' '.' replaced by spaces, split on whitespace."""
  for p in ";,.":
    text = text.replace(p, " ")
  return text.lower().split()


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Everything that defines the world; episodes are a function of (WorldConfig, seed).

  Attributes:
    height, width: frame size in pixels.
    num_frames: frames per episode, a multiple of frames_per_chunk.
    frames_per_chunk: frames per caption chunk (MAGI-1 chunks are 24 pixel frames; tiny worlds
      use fewer).
    min_objects, max_objects: object count range (inclusive); colours within an episode are
      distinct, so max_objects <= len(colours).
    colours: (name, (r, g, b)) pairs; names are lowercase words.
    shapes: subset of SHAPES.
    min_radius, max_radius: ball radius / square half side range, pixels.
    gravity: downward acceleration, px/frame^2 (>= 0).
    min_speed, max_speed: initial speed range, px/frame (direction uniform).
    restitution: walls and collisions keep this fraction of the normal speed (1.0: elastic).
    substeps: physics steps per frame.
    supersample: k x k coverage samples per pixel for balls (squares are exact).
    event_speed: the smallest normal speed, px/frame, of a hit or collision that is an event.
  """
  height: int = 24
  width: int = 24
  num_frames: int = 16
  frames_per_chunk: int = 4
  min_objects: int = 1
  max_objects: int = 1
  colours: tuple = DEFAULT_COLOURS
  shapes: tuple = SHAPES
  min_radius: float = 2.5
  max_radius: float = 3.5
  gravity: float = 0.25
  min_speed: float = 0.5
  max_speed: float = 1.5
  restitution: float = 1.0
  substeps: int = 8
  supersample: int = 4
  event_speed: float = 0.3

  def __post_init__(self):
    # Normalise lists (e.g. from JSON) to tuples so the config stays hashable.
    object.__setattr__(self, "colours",
                       tuple((str(n), tuple(int(c) for c in rgb)) for n, rgb in self.colours))
    object.__setattr__(self, "shapes", tuple(self.shapes))
    self.validate()

  @property
  def num_chunks(self) -> int:
    return self.num_frames // self.frames_per_chunk

  def validate(self) -> None:
    """Raises ValueError naming the offending field."""
    def need(ok, field, msg):
      if not ok:
        raise ValueError(f"WorldConfig.{field}: {msg}")

    for f in ("height", "width", "num_frames", "frames_per_chunk", "min_objects", "max_objects",
              "substeps", "supersample"):
      v = getattr(self, f)
      need(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1, f,
           f"must be a positive integer, got {v!r}")
    for f in ("min_radius", "max_radius", "gravity", "min_speed", "max_speed", "restitution",
              "event_speed"):
      v = getattr(self, f)
      need(isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
           and math.isfinite(v), f, f"must be a finite number, got {v!r}")
    need(self.height >= 8 and self.width >= 8, "height" if self.height < 8 else "width",
         f"frame {self.height}x{self.width} is smaller than 8x8")
    need(self.num_frames % self.frames_per_chunk == 0, "num_frames",
         f"{self.num_frames} is not a multiple of frames_per_chunk {self.frames_per_chunk}")
    need(self.max_objects >= self.min_objects, "max_objects",
         f"{self.max_objects} < min_objects {self.min_objects}")
    need(len(self.colours) >= 1, "colours", "needs at least one colour")
    names = [n for n, _ in self.colours]
    need(len(set(names)) == len(names), "colours", f"duplicate colour names in {names}")
    for n, rgb in self.colours:
      need(bool(n) and n == n.lower() and caption_words(n) == n.split() and
           all(w.isalpha() for w in n.split()), "colours",
           f"colour name {n!r} must be lowercase letters (words separated by spaces)")
      need(len(rgb) == 3 and all(0 <= c <= 255 for c in rgb) and max(rgb) > 0, "colours",
           f"colour {n!r} must be 3 values in 0..255, not black, got {rgb}")
    need(self.max_objects <= len(self.colours), "max_objects",
         f"{self.max_objects} objects need as many distinct colours, only {len(self.colours)}")
    need(len(self.shapes) >= 1, "shapes", "needs at least one shape")
    for s in self.shapes:
      need(s in SHAPES, "shapes", f"unknown shape {s!r}; known: {SHAPES}")
    need(0 < self.min_radius <= self.max_radius, "min_radius",
         f"need 0 < min_radius <= max_radius, got {self.min_radius}, {self.max_radius}")
    need(4 * self.max_radius <= min(self.height, self.width), "max_radius",
         f"{self.max_radius} is too large for the {self.height}x{self.width} frame (the "
         "diameter must be at most half the smaller side)")
    box = (2 * self.max_radius + 1) ** 2
    need(self.max_objects * box <= _MAX_FILL * self.height * self.width, "max_objects",
         f"too many objects: {self.max_objects} objects of radius {self.max_radius} do not fit "
         f"in {self.height}x{self.width} (at most {_MAX_FILL:.0%} of the frame)")
    need(self.gravity >= 0, "gravity", f"must be >= 0 (pointing down), got {self.gravity}")
    need(0 <= self.min_speed <= self.max_speed, "min_speed",
         f"need 0 <= min_speed <= max_speed, got {self.min_speed}, {self.max_speed}")
    need(0 < self.restitution <= 1, "restitution", f"must be in (0, 1], got {self.restitution}")
    need(self.event_speed >= 0, "event_speed", f"must be >= 0, got {self.event_speed}")
    # Fastest possible speed: the initial one plus a fall through the whole frame.
    vmax = math.sqrt(self.max_speed ** 2 + 2 * self.gravity * self.height)
    need(vmax / self.substeps < self.min_radius, "substeps",
         f"{self.substeps} substeps let an object move {vmax / self.substeps:.2f} px per step, "
         f"more than min_radius {self.min_radius} (collisions could be missed)")


@dataclasses.dataclass
class Episode:
  """One simulated episode.

  Attributes:
    frames: uint8 (T, H, W, 3), black background.
    centres: float32 (T, n, 2), object centres (y, x) in pixel-index units.
    velocities: float32 (T, n, 2), px/frame, (vy, vx).
    objects: [(colour_name, shape, radius)] per object.
    caption: the whole-episode caption.
    chunk_captions: one caption per chunk.
    events: per chunk, the event phrases (hits, collisions, then flies / rolls).
    seed: the seed it was simulated from (None for `rollout` with a given state).
  """
  frames: np.ndarray
  centres: np.ndarray
  velocities: np.ndarray
  objects: list
  caption: str
  chunk_captions: list
  events: list
  seed: int | None = None


def object_name(colour: str, shape: str) -> str:
  return f"{colour} {shape}"


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def describe(objects) -> str:
  """'a red ball', 'a red ball and a blue square', 'a X, a Y and a Z'."""
  parts = [f"{_article(c)} {object_name(c, s)}" for c, s, _ in objects]
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def vocabulary(cfg: WorldConfig) -> list[str]:
  """Sorted words any caption of `cfg` can contain (as split by `caption_words`); a superset."""
  words = set(_GRAMMAR_WORDS) | set(cfg.shapes)
  for name, _ in cfg.colours:
    words.update(caption_words(name))
  return sorted(words)


def _mass(shape: str, r: float) -> float:
  return math.pi * r * r if shape == "ball" else 4.0 * r * r


def _contact(pi, ri, si, pj, rj, sj):
  """(normal from i to j, penetration depth); depth <= 0 means no contact."""
  d = pj - pi
  if si == "ball" and sj == "ball":
    dist = float(np.hypot(d[0], d[1]))
    n = d / dist if dist > 0 else np.array([1.0, 0.0])
    return n, ri + rj - dist
  if si == "ball" or sj == "ball":
    # Ball b against square q: towards the square's closest point to the ball's centre.
    flip = sj == "ball"
    pb, rb, pq, rq = (pj, rj, pi, ri) if flip else (pi, ri, pj, rj)
    q = np.clip(pb, pq - rq, pq + rq)
    dq = q - pb
    dist = float(np.hypot(dq[0], dq[1]))
    if dist > 0:
      n, depth = dq / dist, rb - dist
      return (-n if flip else n), depth
  overlap = ri + rj - np.abs(d)   # boxes (and a ball centred inside a square)
  axis = int(np.argmin(overlap))
  n = np.zeros(2)
  n[axis] = 1.0 if d[axis] >= 0 else -1.0
  return n, float(overlap[axis])


def _wall_time(p, v, a, wall, outward, horizon):
  """Earliest t in [0, horizon] with p + v t + a t^2 / 2 == wall while moving `outward` (+1 /
  -1), or None. Roots in the cancellation-free form of the quadratic formula."""
  A, B, C = 0.5 * a, v, p - wall
  if A == 0:
    roots = [-C / B] if B != 0 else []
  else:
    disc = B * B - 4 * A * C
    if disc < 0:
      return None
    q = -0.5 * (B + math.copysign(math.sqrt(disc), B))
    roots = [q / A] + ([C / q] if q != 0 else [])
  best = None
  for t in roots:
    if 0 <= t <= horizon and (v + a * t) * outward > 0 and (best is None or t < best):
      best = t
  return best


def _advance_1d(p, v, a, dt, lo, hi, e, max_bounces=8):
  """Exact constant-acceleration motion for dt between walls lo and hi along one axis.

  At an impact the normal velocity u becomes -e u and the motion continues for the rest of
  the step, so with e = 1 energy is exactly conserved. Returns (p, v, [(time into the step,
  side 0 = lo / 1 = hi, impact speed)]). An object pressed against a wall with no speed (resting
  contact, or after `max_bounces` ever smaller bounces) stays there with zero normal velocity.
  """
  hits = []
  elapsed = 0.0
  for _ in range(max_bounces):
    left = dt - elapsed
    cands = [(t, side) for side, wall, out in ((0, lo, -1), (1, hi, 1))
             if (t := _wall_time(p, v, a, wall, out, left)) is not None]
    if not cands:
      break
    t, side = min(cands)
    u = v + a * t
    p = (lo, hi)[side]
    v = -e * u
    elapsed += t
    hits.append((elapsed, side, abs(u)))
  left = dt - elapsed
  p_end = p + v * left + 0.5 * a * left * left
  v_end = v + a * left
  if p_end < lo or p_end > hi:   # resting contact (or bounces exhausted): stay on the wall
    return (lo if p_end < lo else hi), 0.0, hits
  return p_end, v_end, hits


def _bounds(cfg: WorldConfig, radii: np.ndarray):
  """Per object (lo, hi) arrays of shape (n, 2) for the centre."""
  lo = radii[:, None] - 0.5 + np.zeros((1, 2))
  hi = np.array([[cfg.height - 0.5, cfg.width - 0.5]]) - radii[:, None]
  return lo, hi


def rollout(cfg: WorldConfig, objects, centres, velocities, seed: int | None = None) -> Episode:
  """Simulates and renders an episode from a given initial state.

  Args:
    cfg: the world.
    objects: [(colour_name, shape, radius)], colour names from cfg.colours.
    centres: (n, 2) initial (y, x) centres.
    velocities: (n, 2) initial (vy, vx), px/frame.
    seed: recorded in the Episode only.

  Returns:
    The Episode; frame 0 shows the initial state.
  """
  objects = [(str(c), str(s), float(r)) for c, s, r in objects]
  colour_of = dict(cfg.colours)
  for c, s, _ in objects:
    if c not in colour_of:
      raise ValueError(f"unknown colour {c!r}; the world has {list(colour_of)}")
    if s not in SHAPES:
      raise ValueError(f"unknown shape {s!r}; known: {SHAPES}")
  if len({c for c, _, _ in objects}) != len(objects):
    raise ValueError("objects of one episode must have distinct colours")
  n = len(objects)
  pos = np.array(centres, np.float64).reshape(n, 2)
  vel = np.array(velocities, np.float64).reshape(n, 2)
  radii = np.array([r for _, _, r in objects])
  shapes = [s for _, s, _ in objects]
  lo, hi = _bounds(cfg, radii)
  if np.any(pos < lo - 1e-9) or np.any(pos > hi + 1e-9):
    raise ValueError(f"initial centres {pos.tolist()} put an object outside the frame")
  inv_mass = np.array([1.0 / _mass(s, r) for s, r in zip(shapes, radii)])
  names = [object_name(c, s) for c, s, _ in objects]
  e = float(cfg.restitution)
  dt = 1.0 / cfg.substeps
  acc = np.array([cfg.gravity, 0.0])
  T = cfg.num_frames
  all_pos = np.zeros((T, n, 2))
  all_vel = np.zeros((T, n, 2))
  all_pos[0], all_vel[0] = pos, vel
  events = []   # (time in frames, object indices involved, phrase)
  for t in range(1, T):
    for k in range(cfg.substeps):
      time = t - 1 + (k + 1) * dt
      t0 = time - dt
      for i in range(n):
        for axis in range(2):
          p, v, hits = _advance_1d(pos[i, axis], vel[i, axis], acc[axis], dt, lo[i, axis],
                                   hi[i, axis], e)
          pos[i, axis], vel[i, axis] = p, v
          for tau, side, speed in hits:
            if speed >= cfg.event_speed:
              events.append((t0 + tau, (i,), f"the {names[i]} hits the {WALLS[2 * axis + side]}"))
      for i in range(n):
        for j in range(i + 1, n):
          normal, depth = _contact(pos[i], radii[i], shapes[i], pos[j], radii[j], shapes[j])
          if depth <= 0:
            continue
          vn = float(np.dot(vel[i] - vel[j], normal))
          if vn > 0:   # approaching
            impulse = (1 + e) * vn / (inv_mass[i] + inv_mass[j])
            vel[i] = vel[i] - impulse * inv_mass[i] * normal
            vel[j] = vel[j] + impulse * inv_mass[j] * normal
            if vn >= cfg.event_speed:
              events.append((time, (i, j), f"the {names[i]} collides with the {names[j]}"))
          w = inv_mass[[i, j]] / (inv_mass[i] + inv_mass[j])
          pos[i] = pos[i] - depth * w[0] * normal
          pos[j] = pos[j] + depth * w[1] * normal
      pos = np.clip(pos, lo, hi)
    all_pos[t], all_vel[t] = pos, vel

  caption = describe(objects)
  F = cfg.frames_per_chunk
  chunk_events = [[] for _ in range(cfg.num_chunks)]
  busy = [set() for _ in range(cfg.num_chunks)]
  for time, who, phrase in events:
    c = min(int(math.floor(time + 0.5)), T - 1) // F
    if phrase not in chunk_events[c]:
      chunk_events[c].append(phrase)
    busy[c].update(who)
  on_floor = all_pos[:, :, 0] >= hi[None, :, 0] - _ROLL_TOLERANCE       # (T, n)
  for c in range(cfg.num_chunks):
    for i in range(n):
      if i not in busy[c]:
        rolls = cfg.gravity > 0 and bool(on_floor[c * F:(c + 1) * F, i].all())
        chunk_events[c].append(f"the {names[i]} {'rolls' if rolls else 'flies'}")
  chunk_captions = [f"{caption}; {', '.join(ev)}" for ev in chunk_events]
  frames = render(cfg, objects, all_pos)
  return Episode(frames=frames, centres=all_pos.astype(np.float32),
                 velocities=all_vel.astype(np.float32), objects=objects, caption=caption,
                 chunk_captions=chunk_captions, events=chunk_events, seed=seed)


def _coverage_1d(centre, r, size):
  """(T, size) overlap length of [c - r, c + r] with each pixel [i - 1/2, i + 1/2]."""
  i = np.arange(size)[None, :]
  c = centre[:, None]
  return np.clip(np.minimum(i + 0.5, c + r) - np.maximum(i - 0.5, c - r), 0.0, 1.0)


def coverage(cfg: WorldConfig, shape: str, r: float, centres: np.ndarray) -> np.ndarray:
  """(T, H, W) float fraction of each pixel covered by the object at centres (T, 2)."""
  H, W = cfg.height, cfg.width
  cy, cx = centres[:, 0], centres[:, 1]
  if shape == "square":   # exact: product of the 1D overlaps
    return _coverage_1d(cy, r, H)[:, :, None] * _coverage_1d(cx, r, W)[:, None, :]
  k = cfg.supersample
  off = (np.arange(k) + 0.5) / k - 0.5
  ys = (np.arange(H)[:, None] + off[None, :]).reshape(-1)    # (H*k,)
  xs = (np.arange(W)[:, None] + off[None, :]).reshape(-1)
  dy2 = (ys[None, :] - cy[:, None]) ** 2                       # (T, H*k)
  dx2 = (xs[None, :] - cx[:, None]) ** 2
  inside = dy2[:, :, None] + dx2[:, None, :] <= r * r          # (T, H*k, W*k)
  return inside.reshape(len(cy), H, k, W, k).mean(axis=(2, 4))


def render(cfg: WorldConfig, objects, centres: np.ndarray) -> np.ndarray:
  """uint8 (T, H, W, 3): objects composited in order ("over") on black."""
  centres = np.asarray(centres, np.float64)
  colour_of = dict(cfg.colours)
  img = np.zeros((centres.shape[0], cfg.height, cfg.width, 3))
  for o, (c, s, r) in enumerate(objects):
    a = coverage(cfg, s, r, centres[:, o])[..., None]
    img = img * (1 - a) + np.array(colour_of[c], np.float64) * a
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample_state(cfg: WorldConfig, rng: np.random.Generator):
  """Random (objects, centres (n, 2), velocities (n, 2)) for one episode."""
  n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
  colour_idx = rng.choice(len(cfg.colours), size=n, replace=False)
  objects = []
  for ci in colour_idx:
    shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
    r = float(rng.uniform(cfg.min_radius, cfg.max_radius))
    objects.append((cfg.colours[int(ci)][0], shape, r))
  radii = np.array([r for _, _, r in objects])
  lo, hi = _bounds(cfg, radii)
  centres = np.zeros((n, 2))
  for i in range(n):
    for _ in range(_PLACEMENT_TRIES):
      p = rng.uniform(lo[i], hi[i])
      # Conservative clearance: the circumscribed circles of squares do not touch.
      if all(np.hypot(*(p - centres[j])) > math.sqrt(2) * (radii[i] + radii[j]) + 0.5
             for j in range(i)):
        break
    else:
      raise ValueError(f"WorldConfig.max_objects: could not place {n} objects without overlap "
                       f"in {_PLACEMENT_TRIES} tries; use fewer or smaller objects")
    centres[i] = p
  speed = rng.uniform(cfg.min_speed, cfg.max_speed, size=n)
  angle = rng.uniform(0.0, 2 * math.pi, size=n)
  velocities = np.stack([speed * np.sin(angle), speed * np.cos(angle)], axis=1)
  return objects, centres, velocities


def simulate(cfg: WorldConfig, seed: int) -> Episode:
  """The episode of `seed` (a non-negative integer): same (cfg, seed), same bytes."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  rng = np.random.default_rng(int(seed))
  objects, centres, velocities = sample_state(cfg, rng)
  return rollout(cfg, objects, centres, velocities, seed=int(seed))
