"""Test set-up: 8 simulated CPU devices, so every sharding and collective is exercised."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The bundled digits_captions demo dataset, built once per test session."""
  from data import digits_captions
  d = str(tmp_path_factory.mktemp("tfds"))
  digits_captions.build(d)
  return d
