"""The general pair pipeline: determinism across process counts, exact resume, mixtures,
dedup, masking rates, and wiring into build_lib.build."""
import collections

import numpy as np
import pytest

from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import mixture as mixture_lib
from bepa_jax.data import factory, masking, pair_pipeline, sources
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  return tokenizer_lib.SentencePieceTokenizer(
      tokenizer_lib.train_sentencepiece(corpus_lib.load_embedded().texts(), out, 400))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  c = corpus_lib.load_embedded()
  for j, lang in enumerate(c.languages[:3]):
    (d / f"c.{lang}").write_text("".join(r[j] + "\n" for r in c.rows), encoding="utf-8")
  (d / "p.tsv").write_text("lang_x\ttext_x\tlang_y\ttext_y\n" + "".join(
      f"en\t{r[0]}\tru\t{r[c.languages.index('ru')]}\n" for r in c.rows[:100]), encoding="utf-8")
  return d, c.languages[:3]


def make(tok, spec, B=16, dedup=True, temperature=1.0, seed=5, L=24, mask_prob=0.15):
  comps, weights, stats = sources.open_sources(spec)
  return pair_pipeline.PairPipeline(comps, weights, tok, global_batch=B, max_length=L,
                                    mask_prob=mask_prob, max_predictions=4, seed=seed,
                                    temperature=temperature, dedup=dedup, load_stats=stats)


def spec_of(files):
  d, langs = files
  return f"aligned:{d}/c.{{{','.join(langs)}}}; tsv:{d}/p.tsv@0.5"


@pytest.mark.parametrize("dedup", [True, False])
def test_same_global_batch_for_1_2_4_processes(tok, files, dedup):
  pipes = [make(tok, spec_of(files), dedup=dedup) for _ in range(3)]
  for step in (0, 3, 17):
    whole = pipes[0].batch(step)
    halves = [pipes[1].batch(step, i, 2) for i in range(2)]
    quarters = [pipes[2].batch(step, i, 4) for i in range(4)]
    assert set(whole) >= {"input_ids", "mlm_weights", "text_hash"}
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
      np.testing.assert_array_equal(whole[k], np.concatenate([q[k] for q in quarters]))


def test_resume_mid_epoch_gives_the_following_batches(tok, files):
  run = make(tok, spec_of(files))
  seq = [run.batch(s) for s in range(12)]
  resumed = make(tok, spec_of(files))                # a fresh process restarting at step 7
  for s in range(7, 12):
    b = resumed.batch(s)
    for k in b:
      np.testing.assert_array_equal(b[k], seq[s][k])
  assert not np.array_equal(seq[7]["input_ids"], seq[8]["input_ids"])
  other_seed = make(tok, spec_of(files), seed=6)
  assert not np.array_equal(other_seed.batch(7)["input_ids"], seq[7]["input_ids"])


def test_resume_far_ahead_crosses_mixture_blocks(tok, files):
  a, b = make(tok, spec_of(files)), make(tok, spec_of(files))
  for s in range(0, 600, 150):
    a.texts_of(s)                                      # a walks forward, b jumps straight in
  assert a.texts_of(777) == b.texts_of(777)


def test_epoch_covers_every_pair_once():
  m = mixture_lib.Mixture([64], [1.0], 1.0, global_batch=16, seed=0)
  for epoch in range(2):
    seen = np.concatenate([m.plan(epoch * 4 + s)[1] for s in range(4)])
    assert sorted(seen.tolist()) == list(range(64))


def test_temperature_sampling_over_pairs():
  sizes, w = [10_000, 100], [1.0, 1.0]
  np.testing.assert_allclose(mixture_lib.mixture_probs(sizes, w, 1.0), [100 / 101, 1 / 101])
  np.testing.assert_allclose(mixture_lib.mixture_probs(sizes, w, 2.0), [10 / 11, 1 / 11])
  np.testing.assert_allclose(mixture_lib.mixture_probs(sizes, w, 1e9), [0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(mixture_lib.mixture_probs(sizes, [1.0, 3.0], 1e9), [0.25, 0.75],
                             atol=1e-6)
  m = mixture_lib.Mixture(sizes, w, 2.0, global_batch=32, seed=1)
  comps = np.concatenate([m.plan(s)[0] for s in range(300)])
  assert np.mean(comps == 1) == pytest.approx(1 / 11, abs=0.01)
  with pytest.raises(ConfigError, match="data.temperature"):
    mixture_lib.mixture_probs(sizes, w, 0.0)


def test_no_sentence_twice_in_a_batch(tok, tmp_path):
  # a small corpus full of repeats: without dedup batches would hold false negatives
  en = [f"sentence {i % 12}" for i in range(40)]
  de = [f"Satz {i % 9}" for i in range(40)]
  (tmp_path / "d.en").write_text("\n".join(en) + "\n")
  (tmp_path / "d.de").write_text("\n".join(de) + "\n")
  spec = f"aligned:{tmp_path}/d.{{en,de}}"
  pipe = make(tok, spec, B=8)
  for step in range(20):
    texts = [t for pair in pipe.texts_of(step) for t in pair]
    assert len(set(texts)) == len(texts)
  assert pipe.counters["duplicates_replaced"] > 0
  assert "duplicates replaced" in pipe.report()
  raw = make(tok, spec, B=8, dedup=False)
  assert any(len({x for x, _ in raw.texts_of(s)}) < 8 for s in range(20))
  too_big = make(tok, spec, B=16)                    # only 9 distinct German sentences
  with pytest.raises(InputError, match="data.dedup=False"):
    too_big.batch(0)


class Flaky(sources.Component):
  """A lazy source whose odd records are unusable (as a TFDS record with an empty side)."""
  source, lang_x, lang_y = "flaky", "en", "de"

  def __len__(self):
    return 50

  def __getitem__(self, i):
    return None if i % 2 else (f"x{i}", f"y{i}")


def test_unusable_records_are_redrawn(tok):
  pipe = pair_pipeline.PairPipeline([Flaky()], [1.0], tok, global_batch=8, max_length=16,
                                    mask_prob=0.15, max_predictions=3, seed=0)
  texts = pipe.texts_of(3)
  assert all(int(x[1:]) % 2 == 0 for pair in texts for x in pair)
  assert pipe.counters["unusable_replaced"] > 0


def test_batch_layout_and_masking_rates(tok, files):
  pipe = make(tok, spec_of(files), B=32, L=32)
  n_real = n_pred = n_mask = 0
  for step in range(15):
    b = pipe.batch(step)
    assert b["input_ids"].shape == (32, 2, 32) and b["mlm_positions"].shape == (32, 2, 4)
    assert np.all(b["input_ids"][:, :, 0] == tok.cls_id)
    lengths = b["attention_mask"].sum(-1)
    sep = np.take_along_axis(b["input_ids"], (lengths - 1)[..., None], -1)[..., 0]
    assert np.all(sep == tok.sep_id)
    w = b["mlm_weights"] > 0
    content = lengths - 2
    n_real += int(np.minimum(np.maximum(np.round(content * 0.15), 1), 4).sum())
    n_pred += int(w.sum())
    picked = np.take_along_axis(b["input_ids"], b["mlm_positions"], -1)
    n_mask += int((picked[w] == tok.mask_id).sum())
    assert np.all(b["mlm_positions"][w] >= 1)
    assert np.all(b["mlm_positions"][w] < (lengths - 1)[..., None].repeat(4, -1)[w])
  assert n_pred == n_real                              # 15% of the content tokens, capped at P
  assert n_mask / n_pred == pytest.approx(0.8, abs=0.04)


def test_languages_follow_the_mixture(tok, files):
  pipe = make(tok, spec_of(files), B=32)
  langs = collections.Counter(frozenset(p) for s in range(30) for p in pipe.languages_of(s))
  assert frozenset(("en", "ru")) in langs and len(langs) == 4
  sides = collections.Counter(p[0] for s in range(30) for p in pipe.languages_of(s))
  assert sides["ru"] > 0                               # sides are swapped at random


def test_train_build_and_step_on_file_source(tmp_path, files):
  import jax
  from helpers import tiny_config
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.trainer import loop
  cfg = tiny_config(**{"data.source": spec_of(files), "data.pairs": "en-de,en-ru",
                       "data.temperature": 2.0})
  job = build_lib.build(cfg, str(tmp_path), devices=jax.devices()[:4])
  assert {(c.lang_x, c.lang_y) for c in job.pipeline.components} == {("en", "de"), ("en", "ru")}
  with jax.set_mesh(job.mesh):
    state, metrics = job.step_fn(job.state, loop.global_batch(job.pipeline.batch(0), job.mesh))
  assert np.isfinite(float(metrics["loss"]))
  mono = tmp_path / "mono.txt"
  mono.write_text("a b\nc d\ne f\ng h\n" * 10)
  with pytest.raises(ConfigError, match="loss.weight=0"):
    factory.build_pipeline(tiny_config(**{"data.source": f"mono:en={mono}"}), job.tokenizer)


def test_indexed_files_give_the_same_batches_as_loaded_ones(tok, files, monkeypatch):
  eager = make(tok, spec_of(files))
  monkeypatch.setattr(sources, "LAZY_BYTES", 0)
  lazy = make(tok, spec_of(files))
  assert any(isinstance(c, sources.LazyColumnPair) for c in lazy.components)
  for step in (0, 9):
    a, halves = eager.batch(step), [lazy.batch(step, i, 2) for i in range(2)]
    for k in a:
      np.testing.assert_array_equal(a[k], np.concatenate([h[k] for h in halves]))


def test_checkpoint_position_and_data_fingerprint(tok, files):
  a, b = make(tok, spec_of(files)), make(tok, spec_of(files))
  state = a.state_dict(42)
  assert state["next_step"] == 42 and state["start_step"] == 0
  assert b.verify_state(state) == []                  # same data: resumes
  other = make(tok, spec_of(files), temperature=3.0)
  with pytest.raises(ConfigError, match=r"step 42 was trained on other data \(data.temperature/"
                     r"weights: .*continue_on_new_data"):
    other.verify_state(state)
  masked = make(tok, spec_of(files), mask_prob=0.2)
  with pytest.raises(ConfigError, match=r"data.mask_prob: 0.15 -> 0.2\)"):
    masked.verify_state(state)


def test_a_checkpoint_of_another_batch_plan_is_named(tok, files):
  """Batches drawn by the old plan (row-by-row redraws; no version in the stream) are not those
  of this code: the resume stops naming it, or continues on request."""
  pipe = make(tok, spec_of(files))
  state = pipe.state_dict(42)
  old = dict(state, stream={k: v for k, v in state["stream"].items()
                            if k != "batch plan version"})
  with pytest.raises(ConfigError, match=r"trained on other data \(batch plan version: None -> 2 "
                     r"\(this version of the code draws other batches .*continue_on_new_data"):
    pipe.verify_state(old)
  assert len(pipe.verify_state(old, continue_on_new_data=True)) == 1


def test_continue_on_new_data_starts_the_new_stream_at_the_saved_step(tok, files):
  """The explicit key accepts the change; the new data's position 0 is the restored step, and
  that offset is saved again, so a second resume continues the same stream."""
  old = make(tok, spec_of(files)).state_dict(10)
  new = make(tok, spec_of(files), seed=7)
  changes = new.verify_state(old, continue_on_new_data=True)
  assert changes == ["data.seed: 5 -> 7"]
  fresh = make(tok, spec_of(files), seed=7)
  for k, v in fresh.batch(0).items():
    np.testing.assert_array_equal(new.batch(10)[k], v)
  assert new.texts_of(13) == fresh.texts_of(3)
  again = make(tok, spec_of(files), seed=7)
  assert again.verify_state(new.state_dict(12)) == []   # same new data: nothing to accept
  assert again.start_step == 10 and again.texts_of(12) == fresh.texts_of(2)


def test_tokenizer_fingerprint_is_its_content(tok, tmp_path):
  import shutil
  copy = tmp_path / "copy.model"
  shutil.copy(tok.model_path, copy)
  assert tokenizer_lib.SentencePieceTokenizer(str(copy)).fingerprint() == tok.fingerprint()
  other = tokenizer_lib.train_sentencepiece(
      [f"w{i} v{i % 7} u{i % 13}" for i in range(400)], str(tmp_path / "other"), 60, "unigram")
  assert tokenizer_lib.SentencePieceTokenizer(other).fingerprint() != tok.fingerprint()


def test_vectorised_masking_follows_80_10_10_and_never_picks_specials():
  rng = np.random.default_rng(0)
  N, L, P, vocab = 4000, 48, 12, 500
  n = rng.integers(0, L - 1, size=N)
  seq = np.zeros((N, L), np.int32)
  for i in range(N):
    seq[i, 0], seq[i, 1:n[i] + 1], seq[i, n[i] + 1] = 2, rng.integers(5, vocab, n[i]), 3
  masked, pos, lab, w = masking.mask_batch(
      seq, n, rng.random((N, L + 2 * P)), mask_prob=0.15, max_predictions=P, mask_id=4,
      vocab_size=vocab, random_token_low=5)
  real = w > 0
  np.testing.assert_array_equal(real.sum(1), np.where(n > 0, np.clip(np.round(n * .15), 1, P), 0))
  assert np.all((pos[real] >= 1) & (pos[real] <= np.repeat(n[:, None], P, 1)[real]))
  assert np.all(np.diff(np.where(real, pos, L + 1 + np.arange(P)), axis=1) > 0)  # ascending
  rows = np.repeat(np.arange(N)[:, None], P, 1)
  np.testing.assert_array_equal(lab[real], seq[rows[real], pos[real]])
  unmasked = np.ones_like(seq, bool)
  unmasked[rows[real], pos[real]] = False
  np.testing.assert_array_equal(masked[unmasked], seq[unmasked])   # specials, pads untouched
  got = masked[rows[real], pos[real]]
  assert np.mean(got == 4) == pytest.approx(0.8, abs=0.02)
  assert np.mean((got != 4) & (got != lab[real])) == pytest.approx(0.1, abs=0.015)
  assert np.mean(got == lab[real]) == pytest.approx(0.1, abs=0.015)
  assert got.min() >= 4 and got.max() < vocab


def test_packed_rows_agree_for_any_process_count(tok, files):
  """Packed: each process derives a step's rows from the plan's token counts (no collective),
  so the processes' batches -- steps that fall back included -- are the 1-process batch cut."""
  comps, weights, _ = sources.open_sources(spec_of(files))
  pipes = [pair_pipeline.PairPipeline(comps, weights, tok, global_batch=32, max_length=80,
                                      mask_prob=0.15, max_predictions=4, seed=5, packing=True,
                                      packed_rows=9, batch_shards=4) for _ in range(3)]
  for step in range(8):
    whole = pipes[0].batch(step)
    for P, pipe in ((2, pipes[1]), (4, pipes[2])):
      parts = [pipe.batch(step, p, P) for p in range(P)]
      for k in whole:
        np.testing.assert_array_equal(whole[k], np.concatenate([q[k] for q in parts]), k)
  falls = [p.counters["packing_fallback_steps"] for p in pipes]   # counted by each process
  assert 0 < falls[0] < 8 and falls == [falls[0], 2 * falls[0], 4 * falls[0]]


def test_token_counts_that_change_after_start_up_are_named(tok, files, monkeypatch):
  """The packed rows are agreed from the token counts read at start-up: a tokenizer that
  later gives other counts would split the processes' shapes, so it stops the run."""
  comps, weights, _ = sources.open_sources(spec_of(files))
  pipe = pair_pipeline.PairPipeline(comps, weights, tok, global_batch=16, max_length=64,
                                    mask_prob=0.15, max_predictions=4, seed=5, packing=True,
                                    batch_shards=4)
  real = tok.encode_batch
  monkeypatch.setattr(tok, "encode_batch", lambda texts: [t + [5] for t in real(texts)])
  with pytest.raises(InputError, match="step 0: the tokenizer gives other token counts"):
    pipe.batch(0)
