"""Real (non-pad) and processed token counts, per loss option, and what bepa-train logs."""
import json

import ml_collections
import numpy as np
import pytest

from bepa_jax.training import throughput
from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from tests.helpers import tiny_config


def _batch():
  """2 pairs, L = 8: sentence lengths 3, 5 / 8, 2 (incl. [CLS]/[SEP]); pair grid lengths 6, 9
  of 10."""
  lengths = np.array([[3, 5], [8, 2]])
  am = (np.arange(8)[None, None] < lengths[..., None]).astype(np.int32)
  pair = (np.arange(10)[None] < np.array([6, 9])[:, None]).astype(np.int32)
  return {"input_ids": np.zeros((2, 2, 8), np.int32), "attention_mask": am,
          "mlm_attention_mask": pair}


def _loss(**kw):
  return ml_collections.ConfigDict(dict(dict(cls_input="masked", mlm_input="sentence",
                                             ema_decay=0.0), **kw))


@pytest.mark.parametrize("loss,nonpad,processed", [
    (dict(), 18, 32),                                           # one pass over [2B, L]
    (dict(cls_input="clean"), 36, 64),                          # clean + masked sentences
    (dict(cls_input="clean", mlm_input="pair"), 18 + 15, 32 + 20),  # clean + the pair grid
    (dict(ema_decay=0.99), 36, 64),                             # + the EMA target's pass
    (dict(cls_input="clean", mlm_input="pair", ema_decay=0.99), 18 + 15 + 18, 32 + 20 + 32),
])
def test_counts_per_loss_option(loss, nonpad, processed):
  batch = _batch()
  if loss.get("mlm_input") != "pair":  # sentence MLM: the pipeline has no pair grid
    del batch["mlm_attention_mask"]
  c = throughput.count(batch, _loss(**loss))
  assert (c.real, c.nonpad, c.processed) == (18, nonpad, processed)
  assert c.padding_fraction == pytest.approx(1 - nonpad / processed)


def test_counts_add_and_single_process_global_is_local():
  a = throughput.TokenCounts(3, 4, 10)
  total = a + throughput.TokenCounts(1, 1, 10)
  assert (total.real, total.nonpad, total.processed) == (4, 5, 20)
  assert throughput.global_counts(total) == total
  assert np.isnan(throughput.TokenCounts().padding_fraction)
  meter = throughput.TokenMeter(_loss())
  b = _batch()
  meter.add(b)
  meter.add(b)
  assert meter.take() == throughput.TokenCounts(36, 36, 64)
  assert meter.take() == throughput.TokenCounts()  # the window restarts


@pytest.mark.parametrize("loss", [dict(), dict(cls_input="clean", mlm_input="pair")])
def test_train_logs_real_tokens_and_padding_fraction(tmp_path, loss, caplog):
  """metrics.jsonl: padding_fraction of each logging window and real tokens/s = the real
  tokens of the steps since the clock started / the time, recomputed from the batches."""
  config = tiny_config(**{"train.steps": 6, "train.log_every": 2, "data.max_length": 64,
                          **{f"loss.{k}": v for k, v in loss.items()}})
  with caplog.at_level("INFO", logger="bepa"):
    _, last = loop.train(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 4, 6]
  job = build_lib.build(config, str(tmp_path))  # the same batches: a function of the step
  counts = [throughput.count(job.pipeline.batch(s), config.loss) for s in range(6)]
  assert 0.2 < counts[0].padding_fraction < 0.95  # short sentences padded to 64
  windows = {1: range(0, 1), 2: range(1, 2), 4: range(2, 4), 6: range(4, 6)}
  for r in records:
    window = sum((counts[s] for s in windows[r["step"]]), throughput.TokenCounts())
    assert r["train/padding_fraction"] == pytest.approx(window.padding_fraction, rel=1e-6)
    assert "train/tokens_per_sec" not in r  # the padded figure is gone
    if r["step"] == 1:  # the clock starts after the first step (compilation)
      assert "train/real_tokens_per_sec" not in r
      continue
    since = sum((counts[s] for s in range(1, r["step"])), throughput.TokenCounts())
    steps = r["step"] - 1
    assert r["train/real_tokens_per_sec"] / r["train/steps_per_sec"] == pytest.approx(
        since.real / steps, rel=1e-6)
    assert r["train/processed_tokens_per_sec"] / r["train/steps_per_sec"] == pytest.approx(
        since.processed / steps, rel=1e-6)
  assert last["real_tokens_per_sec"] < last["processed_tokens_per_sec"]
  line = next(m for m in caplog.messages if m.startswith("step 6/6"))
  assert f"{last['real_tokens_per_sec']:.0f} real tok/s, " \
         f"{100 * last['padding_fraction']:.0f}% pad" in line


def test_counts_are_gathered_over_processes_at_log_steps_only():
  """global_counts (an all-gather with several processes) runs when a window is logged, never
  on the steps between: the loop's only per-step work on the host is its own batch."""
  import jax.numpy as jnp
  takes = []

  class Meter:
    def take(self):
      takes.append(1)
      return throughput.TokenCounts(10, 10, 20)

  class Quiet:
    def write(self, *a, **k):
      pass

    def check(self, *a, **k):
      pass

  keys = ("loss", "mlm_loss", "mlm_accuracy", "contrastive_loss", "acc_x2y", "acc_y2x",
          "pos_cos", "neg_cos")
  steplog = loop.StepLog(Quiet(), Meter(), Quiet(), steps=10, first=0, every=4)
  for done in range(1, 11):
    steplog.add(done, {k: jnp.float32(1.0) for k in keys})
  assert len(takes) == 4              # steps 1 (the first), 4, 8 and 10 (the last)
