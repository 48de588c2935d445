"""Fault injection helpers: act on the trainer's data iterator at a chosen batch."""
from big_mm.input import pipeline


class Crash(Exception):
  """Stands for the process dying (kill -9 loses everything not checkpointed)."""


def on_batch(monkeypatch, batch_number, action):
  """Makes the trainer's data iterator call `action(batch)` for its `batch_number`-th batch
  (1-based; the trainer draws batch n for step n of a fresh run). `action` may raise, signal,
  or return a replacement batch."""
  real = pipeline.make_train_iterator

  def make(*args, **kwargs):
    it = real(*args, **kwargs)
    real_next = type(it).__next__
    calls = {"n": 0}

    class Faulty(type(it)):
      def __next__(self):
        calls["n"] += 1
        batch = real_next(self)
        if calls["n"] == batch_number:
          replaced = action(batch)
          if replaced is not None:
            return replaced
        return batch

    it.__class__ = Faulty
    return it

  monkeypatch.setattr(pipeline, "make_train_iterator", make)
