"""Video pp ops (modality kind "video"): decoding with PyAV, clip sampling, spatial ops applied
identically to every frame, multi-clip x multi-crop test views; registered into
`preprocess.OPS` under the key "video".

  # training: one random clip of 16 frames, every 4th frame, random resized crop + flip
  input.pp_modalities = {"video": "decode_video|sample_clip(16, 4)|video_inception_crop(224)|"
                                  "video_flip_lr|video_value_range(-1, 1)"}
  # batch["video"]: float32 [B, 16, 224, 224, 3]
  # evaluation: 5 clips x 3 crops (SlowFast's test views, Feichtenhofer et al. 2019, sec. 4)
  "decode_video|sample_clip(16, 4, 'center', clips=5)|video_resize_small(224)|"
  "video_views(3, 224)|video_value_range(-1, 1)"
  # batch["video"]: float32 [B, 15, 16, 224, 224, 3] (the tower averages over the 15 views)

A record's video is any of: encoded bytes (mp4 / webm / avi / mkv, anything FFmpeg reads), a
path (or fsspec URL) of such a file, a uint8 array [N, H, W, 3] of frames, a list of encoded
image files' bytes or paths (a frame folder's files, in order), or a directory path of image
files (read in sorted name order). Relative paths are relative to the working directory.

Ops, in pp order:
- `decode_video(max_seconds, max_frames)` opens the value lazily (`Video`): a container is
  demuxed (packets only, nothing decoded) to index every frame's timestamp and the keyframes;
  image lists are not read yet. Over max_seconds (the header's duration) or max_frames:
  BadRecord video_too_long, before anything is decoded.
- `sample_clip(num_frames, stride, mode, short, clips)` picks frame indices (`clip_indices`)
  and decodes only what they need: for each needed frame it seeks to the last keyframe at or
  before it (unless the decoder is already between that keyframe and the frame) and decodes
  forward to it; a clip late in a long file costs at most one GOP more than its own span.
  Modes:
    random   start ~ U{0 .. n - span} (span = (num_frames - 1) * stride + 1): training jitter;
    center   the central span; clips=C > 1: C spans with starts evenly spaced from 0 to
             n - span (first and last included; multi-clip testing);
    uniform  num_frames frames evenly spaced over the whole video, ends included
             (round(linspace(0, n - 1, num_frames)); stride must be 1);
    segment  TSN (Wang et al. 2016, sec. 3.1): n split into num_frames equal segments, one
             uniformly random frame from each (training);
    segment_center  the same segments, the frame at each segment's centre; clips=C > 1:
             clip c takes the frame at fraction (c + 0.5) / C of each segment (evaluation).
  A video shorter than the span (random / center; for uniform / segment: fewer than
  num_frames frames) follows `short`: "repeat_last" (frames 0, stride, 2 * stride, ... clamped
  to the last frame, which then repeats), "loop" (the same
  indices modulo n: the video replays from its start) or "skip" (BadRecord video_too_short).
  uniform / segment modes on a short video repeat frames in place (slow motion) unless
  short="skip". Output uint8 [num_frames, H, W, 3], or [clips, num_frames, H, W, 3].
  (Without decode_video first, sample_clip opens the value itself, with no length limits.)
- Spatial ops on [..., H, W, 3] (a clip or several), one draw for every frame of an example:
  video_resize(size), video_resize_small(size), video_central_crop(size),
  video_random_crop(size), video_inception_crop(size, ...), video_flip_lr,
  video_value_range(lo, hi), video_normalize(mean, std).
- `video_views(crops, size)`: `crops` size x size crops of each clip, evenly spaced along the
  longer side and centred along the shorter (3: left / centre / right, as SlowFast's 3-crop
  testing), -> [clips * crops, T, size, size, 3] (clip-major).

Cost (tools/benchmark_input.py --video; the 2-core CI machine, loaded by other jobs): the
training pp above on 10 s 224x224 25 fps H.264 sources costs ~40 ms per clip on one thread
(sample_clip ~27 ms: ~60 frames decoded from the keyframe before the clip with a keyframe
every 12 frames, ~185 with x264's default of one per 250; inception crop ~6 ms;
value_range ~3 ms), and the grain pipeline gives ~15 clips/s per worker process; 64x64
sources ~40-55 clips/s per worker. Frames that the clip does not need are decoded (to
reach it) but not converted to RGB.

Shapes compose (preprocess.OpDef.compose): the sampler fixes T (and clips), a crop / resize /
video_views fixes the size, so `preprocess.output_shape` of the strings above is the example
shape. A string whose frames keep the source's size (no crop or resize) fixes no shape.

Bad data raises BadRecord: corrupt_video (undecodable, or truncated: fewer than 90% of the
frames the header announces, or a needed frame that does not decode), empty_video (0 bytes,
no video stream, no frames), video_too_short (short="skip"), video_too_long (over
decode_video's limits), read (a path that cannot be read), and too_small (a crop larger than
the frames).
"""
from __future__ import annotations

import bisect
import functools
import io

import fsspec
import numpy as np
from PIL import Image

from big_mm.input import preprocess
from big_mm.input.preprocess import BadRecord

VIDEO = "video"
MODES = ("random", "center", "uniform", "segment", "segment_center")
SHORT_RULES = ("repeat_last", "loop", "skip")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# preprocess's argument checks (ValueErrors that the parser reports with the op's signature).
_check_int = preprocess._check_int  # pylint: disable=protected-access
_check_number = preprocess._check_number  # pylint: disable=protected-access
_check_size = preprocess._check_size  # pylint: disable=protected-access
_size2 = preprocess._size2  # pylint: disable=protected-access


# ---- opened videos ---------------------------------------------------------------------

class Video:
  """A video opened for sampling: `num_frames`, `fps` (None when unknown) and
  `read(indices) -> uint8 [k, H, W, 3]`; `decoded` counts the frames decoded so far."""
  num_frames: int = 0
  fps: float | None = None
  decoded: int = 0

  def read(self, indices) -> np.ndarray:
    raise NotImplementedError

  def close(self) -> None:
    pass


class ArrayVideo(Video):
  """Frames already decoded: uint8 [N, H, W, 3]."""

  def __init__(self, frames: np.ndarray):
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise BadRecord("corrupt_video", f"frame array of shape {frames.shape} and dtype "
                      f"{frames.dtype} (want uint8 [N, H, W, 3])")
    if frames.shape[0] == 0 or frames.shape[1] * frames.shape[2] == 0:
      raise BadRecord("empty_video", f"frame array of shape {frames.shape}")
    self.frames, self.num_frames = frames, frames.shape[0]

  def read(self, indices):
    self.decoded += len(indices)
    return self.frames[np.asarray(indices)]


class ImagesVideo(Video):
  """A frame folder: encoded images (bytes or paths), decoded only when read."""

  def __init__(self, items: list):
    if not items:
      raise BadRecord("empty_video", "no frames (an empty image list or folder)")
    self.items, self.num_frames = items, len(items)

  def read(self, indices):
    frames = {}
    for i in sorted(set(int(i) for i in indices)):
      item = self.items[i]
      data = _read_path(item) if isinstance(item, str) else item
      try:
        frames[i] = preprocess.op_decode()(data, None, None)
      except BadRecord as e:
        raise BadRecord("corrupt_video", f"frame {i}: {e}") from None
      self.decoded += 1
    shapes = {f.shape for f in frames.values()}
    if len(shapes) > 1:
      raise BadRecord("corrupt_video", f"frames of different sizes {sorted(shapes)}")
    return np.stack([frames[int(i)] for i in indices])


class EncodedVideo(Video):
  """An encoded video (bytes or a file) opened with PyAV; the constructor demuxes it to index
  the frames (display order = sorted timestamps) and keyframes, decoding nothing."""

  def __init__(self, data, max_seconds: float | None, max_frames: int | None):
    import av  # pylint: disable=g-import-not-at-top
    self._av, self._file = av, None
    try:
      self._file = io.BytesIO(data) if isinstance(data, bytes) else fsspec.open(data, "rb").open()
    except OSError as e:
      raise BadRecord("read", f"{data!r:.200}: {type(e).__name__}: {e}") from None
    try:
      self.container = av.open(self._file, "r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
      self.close()
      raise BadRecord("corrupt_video", f"{type(e).__name__}: {e}") from None
    try:
      self._index(max_seconds, max_frames)
    except BadRecord:
      self.close()
      raise
    self._decoder, self._next = None, -1  # The frame index the decoder yields next.

  def _index(self, max_seconds, max_frames) -> None:
    av = self._av
    if not self.container.streams.video:
      raise BadRecord("empty_video", "no video stream")
    s = self.stream = self.container.streams.video[0]
    rate = s.average_rate or s.guessed_rate
    self.fps = float(rate) if rate else None
    if s.duration is not None and s.time_base is not None:
      seconds = float(s.duration * s.time_base)
    else:
      seconds = self.container.duration / av.time_base if self.container.duration else 0.0
    if max_seconds is not None and seconds > max_seconds:
      raise BadRecord("video_too_long", f"{seconds:.1f} s > {max_seconds} s")
    if max_frames is not None and s.frames > max_frames:
      raise BadRecord("video_too_long", f"{s.frames} frames > {max_frames}")
    times, keys = [], []
    try:
      for packet in self.container.demux(s):
        t = packet.pts if packet.pts is not None else packet.dts
        if packet.size == 0 or t is None:
          continue
        times.append(t)
        if packet.is_keyframe:
          keys.append(t)
        if max_frames is not None and len(times) > max_frames:
          raise BadRecord("video_too_long", f"more than {max_frames} frames")
    except (av.error.FFmpegError, ValueError, OSError) as e:
      raise BadRecord("corrupt_video", f"demuxing: {type(e).__name__}: {e}") from None
    self.times = sorted(set(times))
    if not self.times:
      raise BadRecord("empty_video", "no frames")
    self.num_frames = len(self.times)
    announced = s.frames or (round(seconds * self.fps) if self.fps else 0)
    if self.num_frames < 0.9 * announced - 1:  # Header counts can be a little off.
      raise BadRecord("corrupt_video", f"truncated: {self.num_frames} of the {announced} "
                      "frames its header announces")
    self._position = {t: i for i, t in enumerate(self.times)}
    keyframes = sorted(self._position[t] for t in set(keys))
    self._keyframes = keyframes if keyframes and keyframes[0] == 0 else [0] + keyframes

  def _keyframe_before(self, i: int) -> int:
    return self._keyframes[bisect.bisect_right(self._keyframes, i) - 1]

  def _seek(self, keyframe: int) -> None:
    self.container.seek(self.times[keyframe], stream=self.stream, backward=True)
    self._decoder, self._next = self.container.decode(self.stream), keyframe

  def _decode_to(self, i: int, want: set[int], out: dict[int, np.ndarray]) -> None:
    """Decodes forward until frame i is out, keeping the frames in `want`."""
    av = self._av
    while i not in out:
      try:
        frame = next(self._decoder, None)
      except (av.error.FFmpegError, ValueError) as e:
        raise BadRecord("corrupt_video", f"decoding: {type(e).__name__}: {e}") from None
      if frame is None:
        raise BadRecord("corrupt_video", f"frame {i} of {self.num_frames} does not decode "
                        "(truncated?)")
      self.decoded += 1
      t = frame.pts if frame.pts is not None else frame.dts
      j = self._position.get(t)
      if j is None:
        continue
      if j > i and i not in out:  # The seek overshot (a container's inexact index).
        if self._next == 0:
          raise BadRecord("corrupt_video", f"frame {i} of {self.num_frames} does not decode")
        self._seek(0)
        continue
      self._next = j + 1
      if j in want:
        out[j] = frame.to_ndarray(format="rgb24")

  def read(self, indices):
    want = set(int(i) for i in indices)
    if min(want) < 0 or max(want) >= self.num_frames:
      raise IndexError(f"frame indices {sorted(want)} outside 0..{self.num_frames - 1}")
    out = {}
    for i in sorted(want):
      k = self._keyframe_before(i)
      # Seek when the decoder is past i, or a keyframe lies between it and i.
      if self._decoder is None or self._next > i or k > self._next:
        self._seek(k)
      self._decode_to(i, want, out)
    return np.stack([out[int(i)] for i in indices])

  def close(self) -> None:
    container = getattr(self, "container", None)
    if container is not None:
      container.close()
      self.container = None
    if self._file is not None:
      self._file.close()
      self._file = None


def _read_path(path: str) -> bytes:
  try:
    with fsspec.open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise BadRecord("read", f"{path}: {type(e).__name__}: {e}") from None


def open_video(value, max_seconds: float | None = None,
               max_frames: int | None = None) -> Video:
  """A record's video value (see the module docstring) -> an opened Video."""
  if isinstance(value, Video):
    return value
  if isinstance(value, np.ndarray):
    if value.dtype != object and value.ndim >= 3:
      video = ArrayVideo(value)
      if max_frames is not None and video.num_frames > max_frames:
        raise BadRecord("video_too_long", f"{video.num_frames} frames > {max_frames}")
      return video
    value = value.item() if value.ndim == 0 else value.tolist()  # Bytes / a list, as numpy.
  if isinstance(value, (list, tuple)):
    items = [bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else v for v in value]
    if not all(isinstance(v, (bytes, str)) for v in items):
      raise BadRecord("corrupt_video", "a frame list must hold encoded image bytes or paths")
  elif isinstance(value, str):
    fs, path = fsspec.core.url_to_fs(value)
    if not fs.isdir(path):
      return EncodedVideo(value, max_seconds, max_frames)
    items = sorted(p for p in fs.ls(path, detail=False) if p.lower().endswith(IMAGE_EXTS))
    items = [fs.unstrip_protocol(p) for p in items]
  elif isinstance(value, (bytes, bytearray, memoryview)):
    if not len(value):
      raise BadRecord("empty_video", "0 bytes")
    return EncodedVideo(bytes(value), max_seconds, max_frames)
  else:
    raise BadRecord("corrupt_video", f"video of type {type(value).__name__} (want encoded "
                    "bytes, a path, a frame array or a list of frame images)")
  if max_frames is not None and len(items) > max_frames:
    raise BadRecord("video_too_long", f"{len(items)} frames > {max_frames}")
  return ImagesVideo(items)


def _decode_video(value, rng, ctx, max_seconds, max_frames):
  del rng, ctx
  return open_video(value, max_seconds, max_frames)


def op_decode_video(max_seconds=600, max_frames=None):
  """Opens the record's video lazily (nothing decoded; `Video`). Longer than max_seconds (the
  container's duration; frame arrays / folders have none) or than max_frames frames (None:
  no limit): BadRecord video_too_long, checked before decoding."""
  _check_number("max_seconds", max_seconds, 0)
  if max_frames is not None:
    _check_int("max_frames", max_frames)
  return functools.partial(_decode_video, max_seconds=max_seconds, max_frames=max_frames)


# ---- clip sampling ---------------------------------------------------------------------

def clip_indices(n: int, num_frames: int, stride: int = 1, mode: str = "random",
                 rng: np.random.Generator | None = None, short: str = "repeat_last",
                 clips: int = 1) -> np.ndarray:
  """Frame indices int [clips, num_frames] of a video of n frames (module docstring: the
  modes and the short-video rules); deterministic given rng (random / segment modes)."""
  t = np.arange(num_frames)
  if mode in ("random", "center"):
    span = (num_frames - 1) * stride + 1
    if n < span:
      if short == "skip":
        raise BadRecord("video_too_short", f"{n} frames < the span of {span} "
                        f"({num_frames} frames, stride {stride})")
      steps = t * stride
      return np.tile(steps % n if short == "loop" else np.minimum(steps, n - 1), (clips, 1))
    if mode == "random":
      starts = rng.integers(n - span + 1, size=clips)
    elif clips == 1:
      starts = np.array([(n - span) // 2])
    else:
      starts = np.round(np.arange(clips) * (n - span) / (clips - 1)).astype(np.int64)
    return starts[:, None] + t * stride
  if n < num_frames and short == "skip":
    raise BadRecord("video_too_short", f"{n} frames < {num_frames}")
  if mode == "uniform":
    return np.round(np.linspace(0, n - 1, num_frames)).astype(np.int64)[None]
  if mode == "segment":
    offsets = rng.random((clips, num_frames))
  else:
    offsets = np.broadcast_to(((np.arange(clips) + 0.5) / clips)[:, None], (clips, num_frames))
  return np.minimum(np.floor((t + offsets) * n / num_frames).astype(np.int64), n - 1)


def _sample_clip(value, rng, ctx, num_frames, stride, mode, short, clips):
  del ctx
  video = value if isinstance(value, Video) else open_video(value)
  try:
    idx = clip_indices(video.num_frames, num_frames, stride, mode, rng, short, clips)
    frames = video.read(idx.reshape(-1))
  finally:
    video.close()
  frames = frames.reshape(idx.shape + frames.shape[1:])
  return frames if clips > 1 else frames[0]


def op_sample_clip(num_frames, stride=1, mode="random", short="repeat_last", clips=1):
  """Decodes `clips` clips of num_frames frames, every `stride`-th (mode, short: the module
  docstring) -> uint8 [num_frames, H, W, 3], or [clips, num_frames, H, W, 3] for clips > 1."""
  _check_int("num_frames", num_frames)
  _check_int("stride", stride)
  _check_int("clips", clips)
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if short not in SHORT_RULES:
    raise ValueError(f"short must be one of {SHORT_RULES}, got {short!r}")
  if mode in ("uniform", "segment", "segment_center") and stride != 1:
    raise ValueError(f"mode {mode!r} spreads the frames over the whole video; stride must "
                     f"be 1, got {stride}")
  if mode == "uniform" and clips != 1:
    raise ValueError("mode 'uniform' gives one clip; use 'segment_center' or 'center' for "
                     "several")
  return functools.partial(_sample_clip, num_frames=num_frames, stride=stride, mode=mode,
                           short=short, clips=clips)


def _clip_shape(prev, num_frames, stride, mode, short, clips):
  del prev, stride, mode, short
  return ((clips,) if clips > 1 else ()) + (num_frames, None, None, 3)


# ---- spatial ops: the same transform on every frame ------------------------------------

def _require_frames(x, op: str, uint8: bool = False) -> None:
  if not isinstance(x, np.ndarray) or x.ndim not in (4, 5) or x.shape[-1] != 3:
    raise ValueError(f"pp op {op!r} needs decoded frames [T, H, W, 3] (or [clips, T, H, W, "
                     "3]); start the video pp with 'decode_video|sample_clip(...)'")
  if uint8 and x.dtype != np.uint8:
    raise ValueError(f"pp op {op!r} needs uint8 frames; put it before video_value_range / "
                     "video_normalize")


def _per_frame(x: np.ndarray, fn) -> np.ndarray:
  flat = x.reshape((-1,) + x.shape[-3:])
  out = np.stack([fn(f) for f in flat])
  return out.reshape(x.shape[:-3] + out.shape[1:])


def _resize_frames(x, h, w):
  if x.shape[-3:-1] == (h, w):
    return x
  return _per_frame(x, lambda f: preprocess._resize_to(f, h, w))  # pylint: disable=protected-access


def _video_resize(x, rng, ctx, size):
  del rng, ctx
  _require_frames(x, "video_resize")
  return _resize_frames(x, *_size2(size))


def op_video_resize(size):
  """Resize (bilinear) every frame to size x size, or to (height, width)."""
  _check_size(size)
  return functools.partial(_video_resize, size=size)


def _video_resize_small(x, rng, ctx, size):
  del rng, ctx
  _require_frames(x, "video_resize_small")
  h, w = x.shape[-3:-1]
  s = size / min(h, w)
  return _resize_frames(x, max(1, round(h * s)), max(1, round(w * s)))


def op_video_resize_small(size):
  """Resize (bilinear) every frame so its shorter side is `size`, keeping the aspect ratio."""
  _check_int("size", size)
  return functools.partial(_video_resize_small, size=size)


def _crop_window(x, ch, cw, op):
  h, w = x.shape[-3:-1]
  if h < ch or w < cw:
    raise BadRecord("too_small", f"{op}: frames {h}x{w} < crop {ch}x{cw}")
  return h, w


def _video_crop(x, rng, ctx, size, random):
  del ctx
  op = "video_random_crop" if random else "video_central_crop"
  _require_frames(x, op)
  ch, cw = _size2(size)
  h, w = _crop_window(x, ch, cw, op)
  if random:
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
  else:
    top, left = (h - ch) // 2, (w - cw) // 2
  return x[..., top:top + ch, left:left + cw, :]


def op_video_central_crop(size):
  """Crop every frame's central size x size (or (height, width)) window."""
  _check_size(size)
  return functools.partial(_video_crop, size=size, random=False)


def op_video_random_crop(size):
  """Crop one uniformly random size x size (or (height, width)) window of every frame."""
  _check_size(size)
  return functools.partial(_video_crop, size=size, random=True)


def _video_inception_crop(x, rng, ctx, size, area_min, area_max, ratio_min, ratio_max):
  del ctx
  _require_frames(x, "video_inception_crop", uint8=True)
  h, w = x.shape[-3:-1]
  top, left, ch, cw = preprocess._inception_box(  # pylint: disable=protected-access
      h, w, rng, area_min / 100, area_max / 100, ratio_min, ratio_max)
  oh, ow = _size2(size)
  box = (left, top, left + cw, top + ch)
  return _per_frame(x, lambda f: np.asarray(
      Image.fromarray(f).resize((ow, oh), Image.BILINEAR, box=box)))


def op_video_inception_crop(size, area_min=8, area_max=100, ratio_min=0.75, ratio_max=None):
  """One random resized crop for every frame: area_min..area_max % of the frame, aspect ratio
  log-uniform in ratio_min..ratio_max (default 1 / ratio_min), resized to size. Defaults:
  torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3), as VideoMAE fine-tunes."""
  _check_size(size)
  _check_number("area_min", area_min, 0.01, 100)
  _check_number("area_max", area_max, area_min, 100)
  _check_number("ratio_min", ratio_min, 1e-3, 1e3)
  ratio_max = 1 / ratio_min if ratio_max is None else ratio_max
  _check_number("ratio_max", ratio_max, ratio_min, 1e3)
  return functools.partial(_video_inception_crop, size=size, area_min=area_min,
                           area_max=area_max, ratio_min=ratio_min, ratio_max=ratio_max)


def _video_flip_lr(x, rng, ctx):
  del ctx
  _require_frames(x, "video_flip_lr")
  return x[..., ::-1, :] if rng.random() < 0.5 else x


def op_video_flip_lr():
  """Flip every frame left-right, all or none, with probability 1/2."""
  return _video_flip_lr


def _video_value_range(x, rng, ctx, fn):
  _require_frames(x, "video_value_range")
  return fn(x, rng, ctx)


def op_video_value_range(lo, hi, in_lo=0, in_hi=255):
  """Map values [in_lo, in_hi] (default uint8 [0, 255]) linearly to float32 [lo, hi]."""
  return functools.partial(_video_value_range,
                           fn=preprocess.op_value_range(lo, hi, in_lo, in_hi))


def _video_normalize(x, rng, ctx, fn):
  _require_frames(x, "video_normalize", uint8=True)
  return fn(x, rng, ctx)


def op_video_normalize(mean, std=None):
  """uint8 -> float32 (x/255 - mean) / std per channel; mean: a name (imagenet, clip,
  inception) or 3 numbers, std: 3 numbers (as the image op normalize)."""
  return functools.partial(_video_normalize, fn=preprocess.op_normalize(mean, std))


def _video_views(x, rng, ctx, crops, size):
  del rng, ctx
  _require_frames(x, "video_views")
  clips = x if x.ndim == 5 else x[None]
  h, w = _crop_window(clips, size, size, "video_views")
  long = max(h, w)
  spots = [(long - size) // 2] if crops == 1 else [
      round(i * (long - size) / (crops - 1)) for i in range(crops)]
  views = []
  for clip in clips:
    for s in spots:
      top, left = ((h - size) // 2, s) if w >= h else (s, (w - size) // 2)
      views.append(clip[:, top:top + size, left:left + size])
  return np.stack(views)


def op_video_views(crops=3, size=224):
  """Test views: `crops` size x size crops of each clip, evenly spaced along the longer side
  and centred along the shorter (1: the centre) -> [clips * crops, T, size, size, 3]."""
  _check_int("crops", crops)
  _check_int("size", size)
  return functools.partial(_video_views, crops=crops, size=size)


# ---- shapes ---------------------------------------------------------------------------

def _spatial_shape(size_fn):
  """out_shape of an op keeping the lead dims [..., T] and setting (H, W) = size_fn(args)."""
  def shape(prev, *args):
    return None if prev is None else tuple(prev[:-3]) + size_fn(*args) + (3,)
  return shape


def _views_shape(prev, crops, size):
  if prev is None:
    return None
  clips = prev[0] if len(prev) == 5 else 1
  return (clips * crops, prev[-4], size, size, 3)


def _op(make, out_shape=None):
  return preprocess.OpDef(VIDEO, make, out_shape=out_shape, compose=out_shape is not None)


preprocess.OPS.update({
    "decode_video": _op(op_decode_video),
    "sample_clip": _op(op_sample_clip, _clip_shape),
    "video_resize": _op(op_video_resize, _spatial_shape(_size2)),
    "video_resize_small": _op(op_video_resize_small, _spatial_shape(lambda s: (None, None))),
    "video_central_crop": _op(op_video_central_crop, _spatial_shape(_size2)),
    "video_random_crop": _op(op_video_random_crop, _spatial_shape(_size2)),
    "video_inception_crop": _op(op_video_inception_crop,
                                _spatial_shape(lambda size, *rest: _size2(size))),
    "video_flip_lr": _op(op_video_flip_lr),
    "video_value_range": _op(op_video_value_range),
    "video_normalize": _op(op_video_normalize),
    "video_views": _op(op_video_views, _views_shape),
})
