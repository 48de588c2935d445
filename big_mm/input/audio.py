"""Audio pp ops (modality kind "audio"): waveform decoding, crops, gain, log-mel spectrograms
and SpecAugment, registered into `preprocess.OPS` under the key "audio".

  input.pp_modalities = {"audio": "decode_audio(16000, 30)|random_crop_audio(10)|gain(-6, 6)|"
                                  "log_mel(1000, 64)|spec_augment"}
  # batch["audio"]: float32 [B, 1000, 64] (preprocess.output_shape of the string)

Waveforms are float32 mono [n] in [-1, 1] at the pipeline's sample rate: `decode_audio` reads
encoded bytes (WAV / FLAC / OGG through soundfile) or a numpy array already at that rate
(float, or integer PCM scaled by its full range: int16 / 32768), averages the channels
(arrays: channels last) and resamples with scipy's polyphase filter. The crop ops take
`sample_rate` too, which must equal decode_audio's (a waveform does not carry its rate).

Where the spectrogram is computed: in the input pipeline, with numpy / scipy, one example at a
time in grain's worker processes (input.num_workers), like image decoding; the device gets the
float32 [frames, n_mels] log-mel. tools/benchmark_audio.py measures the per-example cost of
decode_audio + log_mel; on the 2-core CI machine (one BLAS thread, a loaded machine) a 16 kHz
FLAC clip of 1 s costs ~1.2 ms and one of 10 s ~14 ms (half of it log_mel), so a worker core
feeds ~70 ten-second clips per second; 44.1 kHz sources add ~3 ms per second of audio for
resampling (store 16 kHz). log_mel's filterbank is a BLAS matmul: limit BLAS threads in the
workers (OPENBLAS_NUM_THREADS=1), or many workers oversubscribe the cores (log_mel ~3x slower
here with the default threads).

log_mel: frames of `win_ms` every `hop_ms` (no centre padding: frame i starts at sample
i * hop), a symmetric Hann window (numpy.hanning, Kaldi's "hanning"), the power spectrum of an
n_fft-point rfft (n_fft: the next power of two >= the window, as Kaldi; scipy.fft in float32,
several times faster than numpy.fft's float64 one), an HTK mel filterbank
(mel = 2595 log10(1 + f / 700); triangles linear in Hz between mel-spaced edges, peak 1, not
area-normalised: librosa.filters.mel(htk=True, norm=None)), then log(mel + log_offset). With
many mels for a short window the lowest filters can fall between FFT bins (e.g. 128 mels at
25 ms / 16 kHz): those channels are the constant log(log_offset).

Bad data raises BadRecord: corrupt_audio (undecodable bytes), empty_audio (no samples; silence
is fine), nonfinite_audio (NaN / inf samples), audio_too_long (over decode_audio's
max_seconds, checked on the header before decoding).
"""
from __future__ import annotations

import functools
import io
import math

import numpy as np
import scipy.fft
import scipy.signal
import soundfile

from big_mm.input import preprocess
from big_mm.input.preprocess import BadRecord

AUDIO = "audio"
# preprocess's argument checks (ValueErrors that the parser reports with the op's signature).
_check_int = preprocess._check_int  # pylint: disable=protected-access
_check_number = preprocess._check_number  # pylint: disable=protected-access


def _samples(seconds: float, sample_rate: int) -> int:
  return max(1, int(round(seconds * sample_rate)))


def _require_waveform(x, op: str) -> None:
  if not isinstance(x, np.ndarray) or x.ndim != 1:
    raise ValueError(f"pp op {op!r} needs a waveform [n]; start the audio pp with "
                     "'decode_audio' and put it before 'log_mel'")


def _require_spectrogram(x, op: str) -> None:
  if not isinstance(x, np.ndarray) or x.ndim != 2:
    raise ValueError(f"pp op {op!r} needs a spectrogram [frames, n_mels]; put it after "
                     "'log_mel'")


# ---- decode_audio ----------------------------------------------------------------------

def _pcm_to_float(x: np.ndarray) -> np.ndarray:
  """Numeric samples [n] or [n, channels] -> float32 mono in [-1, 1] (ints by full range)."""
  if x.ndim not in (1, 2):
    raise BadRecord("corrupt_audio", f"audio array of shape {x.shape} (want [n] or "
                    "[n, channels])")
  if x.ndim == 2 and x.shape[1] > x.shape[0]:
    raise BadRecord("corrupt_audio", f"audio array of shape {x.shape} looks channels-first; "
                    "store [n, channels]")
  if x.dtype.kind == "i":
    x = x.astype(np.float32) / np.float32(2 ** (8 * x.dtype.itemsize - 1))
  elif x.dtype.kind == "u":
    half = 2 ** (8 * x.dtype.itemsize - 1)
    x = (x.astype(np.float32) - half) / np.float32(half)
  elif x.dtype.kind == "f":
    x = x.astype(np.float32)
  else:
    raise BadRecord("corrupt_audio", f"audio array of dtype {x.dtype}")
  return x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x


def _read_encoded(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
  """Encoded bytes -> (float32 [n, channels], sample rate)."""
  try:
    with soundfile.SoundFile(io.BytesIO(data)) as f:
      if f.frames > max_seconds * f.samplerate:
        raise BadRecord("audio_too_long", f"{f.frames / f.samplerate:.1f} s > {max_seconds} s")
      return f.read(dtype="float32", always_2d=True), f.samplerate
  except BadRecord:
    raise
  except Exception as e:  # libsndfile raises several types for bad or truncated bytes.
    raise BadRecord("corrupt_audio", f"{type(e).__name__}: {e}") from None


def _decode_audio(data, rng, ctx, sample_rate, max_seconds):
  del rng, ctx
  if isinstance(data, np.ndarray) and data.dtype.kind in "iuf":
    x = _pcm_to_float(data)
    if x.size > max_seconds * sample_rate:
      raise BadRecord("audio_too_long", f"{x.size / sample_rate:.1f} s > {max_seconds} s")
    rate = sample_rate
  else:
    if isinstance(data, np.ndarray):  # Encoded bytes stored as a numpy scalar / array.
      data = data.item() if data.ndim == 0 else data.tobytes()
    if not isinstance(data, (bytes, bytearray, memoryview)):
      raise BadRecord("corrupt_audio", f"audio of type {type(data).__name__} (want encoded "
                      "bytes or a numpy array)")
    data = bytes(data)
    if not data:
      raise BadRecord("empty_audio", "0 bytes")
    x, rate = _read_encoded(data, max_seconds)
    x = x.mean(axis=1, dtype=np.float32)
  if x.size == 0:
    raise BadRecord("empty_audio", "0 samples")
  if not np.isfinite(x).all():
    raise BadRecord("nonfinite_audio", f"{np.sum(~np.isfinite(x))} NaN / inf samples")
  if rate != sample_rate:
    g = math.gcd(rate, sample_rate)
    x = scipy.signal.resample_poly(x, sample_rate // g, rate // g).astype(np.float32)
  return x


def op_decode_audio(sample_rate=16000, max_seconds=60):
  """Encoded bytes (WAV / FLAC / OGG ...) or a numpy array at `sample_rate` ([n] or
  [n, channels]; ints scaled by their full range) -> float32 mono [n] at `sample_rate`
  (channels averaged; other rates resampled by scipy.signal.resample_poly with the exact
  integer ratio). Longer than max_seconds: BadRecord audio_too_long."""
  _check_int("sample_rate", sample_rate)
  _check_number("max_seconds", max_seconds, 0)
  if max_seconds <= 0:
    raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
  return functools.partial(_decode_audio, sample_rate=sample_rate, max_seconds=max_seconds)


# ---- waveform ops: fn(x [n], rng, ctx) -> x [m] -----------------------------------------

def _crop_audio(x, rng, ctx, seconds, sample_rate, random):
  del ctx
  _require_waveform(x, "random_crop_audio" if random else "central_crop_audio")
  n = _samples(seconds, sample_rate)
  if x.size <= n:
    return x
  start = int(rng.integers(x.size - n + 1)) if random else (x.size - n) // 2
  return x[start:start + n]


def _check_crop(seconds, sample_rate):
  _check_number("seconds", seconds, 0)
  if seconds <= 0:
    raise ValueError(f"seconds must be > 0, got {seconds!r}")
  _check_int("sample_rate", sample_rate)


def op_random_crop_audio(seconds, sample_rate=16000):
  """A uniformly random window of `seconds` (training jitter); shorter clips stay whole."""
  _check_crop(seconds, sample_rate)
  return functools.partial(_crop_audio, seconds=seconds, sample_rate=sample_rate, random=True)


def op_central_crop_audio(seconds, sample_rate=16000):
  """The central window of `seconds`; shorter clips stay whole."""
  _check_crop(seconds, sample_rate)
  return functools.partial(_crop_audio, seconds=seconds, sample_rate=sample_rate,
                           random=False)


def _gain(x, rng, ctx, min_db, max_db):
  del ctx
  _require_waveform(x, "gain")
  return x * np.float32(10 ** (rng.uniform(min_db, max_db) / 20))


def op_gain(min_db, max_db):
  """Scales the waveform by a gain drawn uniformly in [min_db, max_db] decibels."""
  _check_number("min_db", min_db)
  _check_number("max_db", max_db)
  if min_db > max_db:
    raise ValueError(f"min_db={min_db} must be <= max_db={max_db}")
  return functools.partial(_gain, min_db=float(min_db), max_db=float(max_db))


# ---- log_mel: waveform -> float32 [frames, n_mels] -------------------------------------

def hz_to_mel(f):
  """HTK mel scale."""
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float,
                   fmax: float) -> np.ndarray:
  """HTK-scale triangular filters float32 [n_fft // 2 + 1, n_mels] (peak 1, unnormalised;
  librosa.filters.mel(htk=True, norm=None), transposed)."""
  edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
  lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  up, down = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
  return np.maximum(0.0, np.minimum(up, down)).T.astype(np.float32)


def _log_mel(x, rng, ctx, frames, win, hop, n_fft, window, filterbank, log_offset):
  del rng, ctx
  _require_waveform(x, "log_mel")
  need = (frames - 1) * hop + win
  if x.size < need:
    x = np.pad(x, (0, need - x.size))
  elif x.size > need:
    start = (x.size - need) // 2
    x = x[start:start + need]
  segments = np.lib.stride_tricks.sliding_window_view(x, win)[::hop]
  spectrum = scipy.fft.rfft(segments * window, n=n_fft)  # float32 in, complex64 out
  power = (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32)
  return np.log(power @ filterbank + np.float32(log_offset)).astype(np.float32)


def op_log_mel(frames, n_mels=64, sample_rate=16000, win_ms=25, hop_ms=10, fmin=0, fmax=None,
               log_offset=1e-6):
  """Waveform -> log-mel float32 [frames, n_mels] (the module docstring has the recipe). The
  waveform is zero-padded at the end, or centre-cropped, to the (frames - 1) * hop + win
  samples that `frames` frames cover. fmax: None = sample_rate / 2."""
  _check_int("frames", frames)
  _check_int("n_mels", n_mels)
  _check_int("sample_rate", sample_rate)
  _check_number("win_ms", win_ms, 0)
  _check_number("hop_ms", hop_ms, 0)
  nyquist = sample_rate / 2
  fmax = nyquist if fmax is None else fmax
  _check_number("fmin", fmin, 0, nyquist)
  _check_number("fmax", fmax, 0, nyquist)
  if fmin >= fmax:
    raise ValueError(f"fmin={fmin} must be < fmax={fmax}")
  _check_number("log_offset", log_offset, 0)
  if log_offset <= 0:
    raise ValueError(f"log_offset must be > 0 (log of silence), got {log_offset!r}")
  win, hop = round(win_ms * sample_rate / 1000), round(hop_ms * sample_rate / 1000)
  if win < 2 or hop < 1:
    raise ValueError(f"win_ms={win_ms} / hop_ms={hop_ms} give a window of {win} and a hop of "
                     f"{hop} samples at {sample_rate} Hz; need a window >= 2 and a hop >= 1")
  n_fft = 1 << (win - 1).bit_length()
  return functools.partial(
      _log_mel, frames=frames, win=win, hop=hop, n_fft=n_fft,
      window=np.hanning(win).astype(np.float32),
      filterbank=mel_filterbank(n_mels, n_fft, sample_rate, fmin, fmax),
      log_offset=float(log_offset))


# ---- spectrogram ops: fn(x [frames, n_mels], rng, ctx) -> same shape --------------------

def _normalize_audio(x, rng, ctx, mean, std):
  del rng, ctx
  _require_spectrogram(x, "normalize_audio")
  return (x - np.float32(mean)) / np.float32(std)


def op_normalize_audio(mean, std):
  """(x - mean) / std of the log-mel, e.g. a dataset's statistics. AST (Gong et al. 2021)
  uses AudioSet's mean -4.2677393 and 2 * 4.5689974 as std (transformers@7a91be8
  models/audio_spectrogram_transformer/feature_extraction_audio_spectrogram_transformer.py:
  (fbank - mean) / (std * 2)), but over Kaldi fbank features (pre-emphasis, DC removal) that
  log_mel does not reproduce exactly: measure your own data's statistics."""
  _check_number("mean", mean)
  _check_number("std", std, 0)
  if std <= 0:
    raise ValueError(f"std must be > 0, got {std!r}")
  return functools.partial(_normalize_audio, mean=float(mean), std=float(std))


def _spec_augment(x, rng, ctx, freq_masks, freq_width, time_masks, time_width, value):
  del ctx
  _require_spectrogram(x, "spec_augment")
  x = x.copy()
  for axis, masks, width in ((1, freq_masks, freq_width), (0, time_masks, time_width)):
    size = x.shape[axis]
    for _ in range(masks):
      w = min(int(rng.integers(width + 1)), size)
      start = int(rng.integers(size - w + 1))
      if axis:
        x[:, start:start + w] = value
      else:
        x[start:start + w] = value
  return x


def op_spec_augment(freq_masks=2, freq_width=8, time_masks=2, time_width=10, value=0.0):
  """SpecAugment's masking (Park et al. 2019, section 2; its time warping is left out): each
  of `freq_masks` masks sets f ~ U{0..freq_width} consecutive mel channels starting at
  f0 ~ U{0..n_mels - f} to `value`; `time_masks` likewise over frames with time_width.
  Masks may overlap; the shape is kept."""
  for name, v in (("freq_masks", freq_masks), ("freq_width", freq_width),
                  ("time_masks", time_masks), ("time_width", time_width)):
    _check_int(name, v, lo=0)
  _check_number("value", value)
  return functools.partial(_spec_augment, freq_masks=freq_masks, freq_width=freq_width,
                           time_masks=time_masks, time_width=time_width, value=float(value))


preprocess.OPS.update({
    "decode_audio": preprocess.OpDef(AUDIO, op_decode_audio),
    "random_crop_audio": preprocess.OpDef(AUDIO, op_random_crop_audio),
    "central_crop_audio": preprocess.OpDef(AUDIO, op_central_crop_audio),
    "gain": preprocess.OpDef(AUDIO, op_gain),
    "log_mel": preprocess.OpDef(AUDIO, op_log_mel,
                                out_shape=lambda frames, n_mels, *rest: (frames, n_mels)),
    "normalize_audio": preprocess.OpDef(AUDIO, op_normalize_audio),
    "spec_augment": preprocess.OpDef(AUDIO, op_spec_augment),
})
