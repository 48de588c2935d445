"""Point-cloud preprocessing ops (modality kind "points"): a record's cloud -> float32 [N, 3].

  pp_modalities={"points": "sample_points(1024)|normalize_points|random_rotate_points('z')|"
                           "random_scale_points(0.8, 1.25)|jitter_points(0.01, 0.05)"}
  eval: "fps_points(1024)|normalize_points"

A value is a float array [n, 3] or [n, c >= 3] (xyz first; normals / colours are dropped),
or the bytes of such an array saved with np.save (.npy). One that is not (not finite, wrong
shape, no points, fewer points than `sample_points(n, replace_if_short=False)` needs) raises
BadRecord("bad_points"). Ops are deterministic given the per-example rng.

The ops follow ULIP / Point-BERT's data pipeline (salesforce/ULIP `pc_norm`,
`random_scale_point_cloud(scale_low=0.8, scale_high=1.25)`, `jitter_point_cloud(sigma=0.01,
clip=0.05)`, from PointNet++'s provider.py): normalise to the unit sphere at the centroid,
random rotation about the up axis, isotropic scale, clipped Gaussian jitter. `sample_points`
(a random subset, training) and `fps_points` (farthest point subsampling, evaluation) fix the
output shape to (n, 3).
"""
from __future__ import annotations

import io

import numpy as np

from big_mm.input import preprocess
from big_mm.input.preprocess import BadRecord

POINTS = "points"  # The op key: the modality kind (big_mm.modalities.POINTS).


def to_points(value) -> np.ndarray:
  """A record's cloud (array [n, c >= 3] or .npy bytes) -> float32 [n, 3] (BadRecord if bad)."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    try:
      value = np.load(io.BytesIO(bytes(value)), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise BadRecord("bad_points", f"bytes that are not a .npy array ({e})") from None
  try:
    arr = np.asarray(value, np.float32)
  except (TypeError, ValueError):
    raise BadRecord("bad_points", f"not a numeric array: {type(value).__name__}") from None
  if arr.ndim != 2 or arr.shape[1] < 3 or arr.shape[0] < 1:
    raise BadRecord("bad_points", f"shape {arr.shape}, expected [n >= 1, 3] (xyz first)")
  arr = arr[:, :3]
  if not np.all(np.isfinite(arr)):
    raise BadRecord("bad_points", "NaN or inf coordinates")
  return arr


def farthest_points(xyz: np.ndarray, n: int) -> np.ndarray:
  """Indices [n] of a farthest point subsample of xyz [m, 3] (n <= m): it starts at the point
  farthest from the centroid, then adds the point farthest from those chosen. Depends on the
  geometry only, not on the order of the points (up to exact ties)."""
  xyz = xyz.astype(np.float64)
  idx = np.empty(n, np.int64)
  idx[0] = np.argmax(np.sum((xyz - xyz.mean(0)) ** 2, axis=1))
  dist = np.sum((xyz - xyz[idx[0]]) ** 2, axis=1)
  for i in range(1, n):
    idx[i] = np.argmax(dist)
    dist = np.minimum(dist, np.sum((xyz - xyz[idx[i]]) ** 2, axis=1))
  return idx


def _check_nonnegative(name, value):
  preprocess._check_number(name, value, lo=0)  # pylint: disable=protected-access


def op_sample_points(n, replace_if_short=True):
  """n points drawn at random without replacement; a cloud with fewer than n points gives
  all its points plus random repeats (replace_if_short) or BadRecord("bad_points")."""
  preprocess._check_int("n", n)  # pylint: disable=protected-access

  def fn(value, rng, ctx):
    del ctx
    xyz = to_points(value)
    m = len(xyz)
    if m < n and not replace_if_short:
      raise BadRecord("bad_points", f"{m} points, sample_points needs {n} "
                                    "(or replace_if_short=True)")
    idx = rng.permutation(m)[:n] if m >= n else np.concatenate(
        [rng.permutation(m), rng.integers(0, m, n - m)])
    return xyz[idx]
  return fn


def op_fps_points(n):
  """n points by farthest point subsampling (deterministic: the evaluation counterpart of
  sample_points); a cloud with fewer points is repeated cyclically up to n."""
  preprocess._check_int("n", n)  # pylint: disable=protected-access

  def fn(value, rng, ctx):
    del rng, ctx
    xyz = to_points(value)
    if len(xyz) < n:
      return xyz[np.arange(n) % len(xyz)]
    return xyz[farthest_points(xyz, n)]
  return fn


def op_normalize_points():
  """Centre at the centroid, scale so the farthest point has norm 1 (ULIP's pc_norm)."""
  def fn(value, rng, ctx):
    del rng, ctx
    xyz = to_points(value)
    xyz = xyz - xyz.mean(0)
    radius = float(np.max(np.linalg.norm(xyz, axis=1)))
    return (xyz / radius if radius > 0 else xyz).astype(np.float32)
  return fn


def random_rotation(axis: str, rng: np.random.Generator) -> np.ndarray:
  """A random rotation matrix [3, 3]: uniform angle about z, or uniform over SO(3) (a uniform
  unit quaternion, Shoemake 1992)."""
  if axis == "z":
    a = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
  w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
  return np.array([
      [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def op_random_rotate_points(axis="z"):
  """A random rotation: about the up (z) axis ("z"), or any rotation ("so3")."""
  if axis not in ("z", "so3"):
    raise ValueError(f"axis must be 'z' or 'so3', got {axis!r}")

  def fn(value, rng, ctx):
    del ctx
    return (to_points(value) @ random_rotation(axis, rng).T).astype(np.float32)
  return fn


def op_random_scale_points(lo=0.8, hi=1.25):
  """Multiplies the cloud by one scale drawn uniformly from [lo, hi]."""
  _check_nonnegative("lo", lo)
  _check_nonnegative("hi", hi)
  if lo > hi:
    raise ValueError(f"lo={lo} > hi={hi}")

  def fn(value, rng, ctx):
    del ctx
    return (to_points(value) * rng.uniform(lo, hi)).astype(np.float32)
  return fn


def op_jitter_points(sigma=0.01, clip=0.05):
  """Adds Gaussian noise of std sigma to every coordinate, clipped to [-clip, clip]."""
  _check_nonnegative("sigma", sigma)
  _check_nonnegative("clip", clip)

  def fn(value, rng, ctx):
    del ctx
    xyz = to_points(value)
    noise = np.clip(sigma * rng.standard_normal(xyz.shape), -clip, clip)
    return (xyz + noise).astype(np.float32)
  return fn


preprocess.OPS.update({
    "sample_points": preprocess.OpDef(POINTS, op_sample_points,
                                      out_shape=lambda n, replace_if_short: (n, 3)),
    "fps_points": preprocess.OpDef(POINTS, op_fps_points, out_shape=lambda n: (n, 3)),
    "normalize_points": preprocess.OpDef(POINTS, op_normalize_points),
    "random_rotate_points": preprocess.OpDef(POINTS, op_random_rotate_points),
    "random_scale_points": preprocess.OpDef(POINTS, op_random_scale_points),
    "jitter_points": preprocess.OpDef(POINTS, op_jitter_points),
})
