"""Input preprocessing throughput: per-op timings and the real grain pipeline (CPU only).

  python tools/benchmark_input.py                       # sizes 256,512,1024; workers 0,1,2
  python tools/benchmark_input.py --sizes 512 --workers 0,4 --seconds 10

Source images: real photos, scikit-learn's bundled sample images (china.jpg, flower.jpg,
427x640; no network), resized so the shorter side is each --sizes value and re-encoded as
JPEG (quality 90). The pp string is the usual training one,
`decode|resize(256)|random_crop(224)|flip_lr|value_range(-1,1)` (plus tokenize(16) in the
pipeline part).

(a) Per-op timing: each op timed on its own, single-threaded, per source size; also with
    `decode(shrink_to=256)` (JPEG DCT-domain downscaling, see preprocess.op_decode).
(b) The real TrainIterator (grain) over an in-memory source of those JPEGs, with
    num_workers 0/1/2 (num_threads=1 per process), in images/s and images/s per core
    (cores = max(1, num_workers): the busy processes), plus shrink_to=256 at the most
    workers. Worker start-up is excluded.
Prints a Markdown table; timings on a shared machine are noisy (the load average is shown).

  python tools/benchmark_input.py --video --sizes 224 --workers 0,1,2   # decoded clips/s

--video: clips instead of images. Sources: 10 s of 25 fps H.264 (libx264, yuv420p, crf 23)
panning across each photo at each --sizes, with a keyframe every --video_gops frames (x264's
default is 250: one per 10 s clip, so a late clip decodes from the start). The pp is the
VideoMAE training one, `decode_video|sample_clip(16, 4)|video_inception_crop(S)|video_flip_lr|
video_value_range(-1,1)` (S = min(size, 224)): (a) per op, single thread, ms per clip;
(b) the grain TrainIterator in binding mode (input.modalities=("video", "text")), clips/s and
clips/s per worker.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from big_mm.input import pipeline, preprocess, sources  # pylint: disable=wrong-import-position

PP_IMAGE = "decode|resize(256)|random_crop(224)|flip_lr|value_range(-1,1)"
PP_IMAGE_SHRINK = "decode(shrink_to=256)|resize(256)|random_crop(224)|flip_lr|value_range(-1,1)"
TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")


def sample_photos() -> list[np.ndarray]:
  """Real RGB photos bundled with scikit-image (if installed) or scikit-learn."""
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
    return [data.astronaut(), data.chelsea(), data.coffee()]
  except ImportError:
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
    return list(load_sample_images().images)


def make_jpegs(short_side: int, photos) -> list[bytes]:
  out = []
  for photo in photos:
    h, w = photo.shape[:2]
    s = short_side / min(h, w)
    im = Image.fromarray(photo).resize((round(w * s), round(h * s)), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def time_ops(pp: str, jpegs: list[bytes], seconds: float) -> dict[str, float]:
  """Mean seconds per image of each op, run in sequence on one thread."""
  ops = preprocess.parse_pp(pp)
  totals, n = collections.Counter(), 0
  rng = np.random.default_rng(0)
  ctx = preprocess.Context()
  start = time.perf_counter()
  while time.perf_counter() - start < seconds or n < 2 * len(jpegs):
    value = jpegs[n % len(jpegs)]
    for op in ops:
      t = time.perf_counter()
      value = op(value, rng, ctx)
      totals[op.name] += time.perf_counter() - t
    n += 1
  return {k: v / n for k, v in totals.items()}


class _InMemory:
  """Patches sources.open_source to return `records` (the pipeline pickles the source
  into its workers, so they see it too)."""

  def __init__(self, records):
    self.records, self.real = records, sources.open_source

  def __enter__(self):
    sources.open_source = lambda *a, **k: self.records

  def __exit__(self, *exc):
    sources.open_source = self.real


def time_pipeline(pp: str, jpegs: list[bytes], num_workers: int, batch: int,
                  seconds: float) -> float:
  """Images/s of the real training iterator after start-up (two warm-up batches)."""
  records = [{"image": jpegs[i % len(jpegs)], "text": f"photo {i}"} for i in range(4096)]
  cfg = dict(data="in_memory", tokenizer=TOKENIZER, text_len=16, pp_image=pp,
             num_workers=num_workers, num_threads=1, prefetch=2, shuffle=True)
  with _InMemory(records):
    it = pipeline.make_train_iterator(cfg, global_batch_size=batch, seed=0, sharding=None)
  try:
    for _ in range(2):
      next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      b = next(it)
      assert b["image"].shape == (batch, 224, 224, 3)
      n += batch
    return n / (time.perf_counter() - start)
  finally:
    it.close()


def pp_video(size: int) -> str:
  return (f"decode_video|sample_clip(16, 4)|video_inception_crop({min(size, 224)})|"
          "video_flip_lr|video_value_range(-1, 1)")


def make_videos(size: int, gop: int, photos, seconds: float = 10, fps: int = 25) -> list[bytes]:
  """H.264 mp4s (size x size) of a window panning across each photo."""
  import av  # pylint: disable=g-import-not-at-top
  out = []
  for photo in photos:
    h, w = photo.shape[:2]
    side, n = min(h, w) * 3 // 4, int(seconds * fps)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
      s = c.add_stream("libx264", rate=fps)
      s.width = s.height = size
      s.pix_fmt = "yuv420p"
      s.codec_context.gop_size = gop
      s.options = {"preset": "veryfast", "crf": "23"}
      for i in range(n):
        top, left = (h - side) * i // n, (w - side) * i // n
        window = Image.fromarray(photo[top:top + side, left:left + side])
        frame = np.asarray(window.resize((size, size), Image.BILINEAR))
        for packet in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
          c.mux(packet)
      for packet in s.encode():
        c.mux(packet)
    out.append(buf.getvalue())
  return out


def time_video_pipeline(pp: str, clip_shape, videos: list[bytes], num_workers: int,
                        batch: int, seconds: float) -> float:
  """Clips/s of the real training iterator (binding mode) after two warm-up batches."""
  records = [{"video": videos[i % len(videos)], "text": f"clip {i}"} for i in range(4096)]
  cfg = dict(data="in_memory", tokenizer=TOKENIZER, text_len=16, pp_image=PP_IMAGE,
             num_workers=num_workers, num_threads=1, prefetch=2, shuffle=True,
             modalities=("video", "text"), pp_modalities={"video": pp})
  with _InMemory(records):
    it = pipeline.make_train_iterator(cfg, global_batch_size=batch, seed=0, sharding=None)
  try:
    for _ in range(2):
      next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      b = next(it)
      assert b["video"].shape == (batch,) + clip_shape and b["video_present"].all()
      n += batch
    return n / (time.perf_counter() - start)
  finally:
    it.close()


def video_main(args, sizes, workers, photos) -> int:
  gops = [int(g) for g in args.video_gops.split(",")]
  print(f"video pp: {pp_video(224)}; {len(photos)} clips of 10 s at 25 fps; cores: "
        f"{os.cpu_count()}; load average before: {os.getloadavg()[0]:.1f}")
  names = [op.name for op in preprocess.parse_pp(pp_video(224))]
  print("\n(a) per op, single thread, ms per clip\n")
  print("| source | keyframe every | KB | " + " | ".join(names) + " | total ms | clips/s |")
  print("|---" * (len(names) + 5) + "|")
  videos = {(size, gop): make_videos(size, gop, photos) for size in sizes for gop in gops}
  for (size, gop), clips in videos.items():
    kb = np.mean([len(v) for v in clips]) / 1024
    time_ops(pp_video(size), clips, 0)  # Warm-up: PyAV's first open and decode.
    ms = {k: 1e3 * v for k, v in time_ops(pp_video(size), clips, args.seconds).items()}
    total = sum(ms.values())
    print(f"| {size}px | {gop} | {kb:.0f} | " + " | ".join(f"{ms[n]:.2f}" for n in names)
          + f" | {total:.1f} | {1e3 / total:.0f} |", flush=True)
  print(f"\n(b) grain TrainIterator, binding mode (video, text), batch {args.batch}, "
        "num_threads=1 per process\n")
  print("| source | keyframe every | num_workers | clips/s | clips/s per worker |")
  print("|---|---|---|---|---|")
  for (size, gop), clips in videos.items():
    shape = preprocess.output_shape(pp_video(size))
    for w in workers:
      rate = time_video_pipeline(pp_video(size), shape, clips, w, args.batch, args.seconds)
      print(f"| {size}px | {gop} | {w} | {rate:.1f} | {rate / max(1, w):.1f} |", flush=True)
  print(f"\nload average after: {os.getloadavg()[0]:.1f}")
  return 0


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="256,512,1024", help="source shorter sides (px)")
  p.add_argument("--workers", default="0,1,2", help="grain num_workers values")
  p.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--video", action="store_true", help="decoded clips/s of a video pp")
  p.add_argument("--video_gops", default="12,250", help="--video: keyframe intervals")
  args = p.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")]
  workers = [int(w) for w in args.workers.split(",")]
  photos = sample_photos()
  if args.video:
    return video_main(args, sizes, workers, photos)
  print(f"pp: {PP_IMAGE}; {len(photos)} photos; cores: {os.cpu_count()}; "
        f"load average before: {os.getloadavg()[0]:.1f}")

  names = [op.name for op in preprocess.parse_pp(PP_IMAGE)]
  print("\n(a) per op, single thread, ms per image\n")
  print("| source | jpeg KB | decode | " + " | ".join(names[1:]) + " | total ms | images/s |")
  print("|---" * (len(names) + 4) + "|")
  for size in sizes:
    jpegs = make_jpegs(size, photos)
    kb = np.mean([len(j) for j in jpegs]) / 1024
    for pp, label in ((PP_IMAGE, "decode"), (PP_IMAGE_SHRINK, "decode(shrink_to=256)")):
      ms = {k: 1e3 * v for k, v in time_ops(pp, jpegs, args.seconds).items()}
      total = sum(ms.values())
      print(f"| {size}px | {kb:.0f} | {label} {ms['decode']:.2f} | "
            + " | ".join(f"{ms[n]:.2f}" for n in names[1:])
            + f" | {total:.2f} | {1e3 / total:.0f} |", flush=True)

  print(f"\n(b) grain TrainIterator (+ tokenize(16)), batch {args.batch}, "
        "num_threads=1 per process\n")
  print("| source | decode | num_workers | images/s | images/s per core |")
  print("|---|---|---|---|---|")
  for size in sizes:
    jpegs = make_jpegs(size, photos)
    runs = [(PP_IMAGE, "full", w) for w in workers] + [
        (PP_IMAGE_SHRINK, "shrink_to=256", max(workers))]
    for pp, label, w in runs:
      rate = time_pipeline(pp, jpegs, w, args.batch, args.seconds)
      print(f"| {size}px | {label} | {w} | {rate:.0f} | {rate / max(1, w):.0f} |", flush=True)
  print(f"\nload average after: {os.getloadavg()[0]:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
