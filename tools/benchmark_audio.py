"""Per-example cost of the audio pipeline ops decode_audio + log_mel (CPU, one thread).

  OPENBLAS_NUM_THREADS=1 python tools/benchmark_audio.py      # as a grain worker should run

Clips: a 440 Hz tone plus noise, 1 s and 10 s, encoded as mono FLAC at 16 kHz (no resampling),
8 kHz and 44.1 kHz (resampled to 16 kHz); log_mel(100 per second, 64) at 25 ms / 10 ms. Each
time is the minimum over repeats of the mean per call (robust to a shared machine). Prints a
Markdown table.
"""
from __future__ import annotations

import io
import os
import sys
import timeit

import numpy as np
import soundfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from big_mm.input import preprocess  # pylint: disable=wrong-import-position


def flac_clip(seconds: int, sample_rate: int) -> bytes:
  t = np.arange(seconds * sample_rate) / sample_rate
  noise = 0.01 * np.random.default_rng(0).standard_normal(t.size)
  buf = io.BytesIO()
  soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32),
                  sample_rate, format="FLAC")
  return buf.getvalue()


def per_call(fn, number: int) -> float:
  return min(timeit.repeat(fn, number=number, repeat=7)) / number


def main():
  print("| clip | source rate | decode_audio (ms) | log_mel (ms) | total (ms) |")
  print("|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  for seconds in (1, 10):
    for rate in (16000, 8000, 44100):
      data = flac_clip(seconds, rate)
      decode, log_mel = preprocess.parse_pp(f"decode_audio(16000)|log_mel({100 * seconds}, 64)")
      wave = decode(data, rng)
      number = 200 // seconds
      t_decode = per_call(lambda: decode(data, rng), number)  # pylint: disable=cell-var-from-loop
      t_mel = per_call(lambda: log_mel(wave, rng), number)  # pylint: disable=cell-var-from-loop
      print(f"| {seconds} s | {rate} Hz | {1e3 * t_decode:.2f} | {1e3 * t_mel:.2f} | "
            f"{1e3 * (t_decode + t_mel):.2f} |")
  print(f"\nload average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
  main()
