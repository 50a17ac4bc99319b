"""Host-side masking and the deterministic pair pipeline on the bundled corpus (the
`embedded` source kind, read by the same PairPipeline as every other source)."""
import numpy as np
import pytest

from bepa_jax.config import defaults as default_config
from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import factory
from bepa_jax.data import pipeline as pipeline_lib
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.data import tokenizers as tokenizers_lib
from bepa_jax.data.masking import mask_batch


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  path = tokenizer_lib.train_sentencepiece(corpus_lib.load_embedded().texts(), out, 400)
  return tokenizer_lib.SentencePieceTokenizer(path)


def _embedded_pipeline(tok, languages="en,de,fr,es,ru,el"):
  c = default_config.get_config()
  c.data.source, c.data.languages, c.data.seed = "embedded", languages, 3
  c.data.max_length, c.data.mask_prob, c.data.max_predictions_per_seq = 24, 0.15, 6
  c.train.global_batch = 32
  c.data.packing = False  # the padded layout; tests/test_packing.py checks the packed one
  return factory.build_pipeline(c, tok)


@pytest.fixture(scope="module")
def pipe(tok):
  return _embedded_pipeline(tok)


def test_embedded_is_an_ordinary_source_behind_the_pipeline_interface(pipe, tok):
  assert isinstance(pipe, pipeline_lib.Pipeline)
  langs = corpus_lib.load_embedded().languages
  assert len(pipe.components) == len(langs) * (len(langs) - 1) // 2  # every unordered pair
  two = _embedded_pipeline(tok, "en,ru")
  assert {frozenset(p) for p in two.languages_of(0)} == {frozenset(("en", "ru"))}
  with pytest.raises(Exception, match="data.languages"):
    _embedded_pipeline(tok, "en,xx")


def test_bundled_corpus_is_multilingual_and_unique():
  c = corpus_lib.load_embedded()
  assert len(c) >= 300 and len(c.languages) >= 5
  assert any("\u0400" <= ch <= "\u04ff" for ch in c.rows[0][c.languages.index("ru")])
  for j in range(len(c.languages)):
    column = [r[j] for r in c.rows]
    assert len(set(column)) == len(column)


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)


def test_masking_never_selects_specials_and_follows_80_10_10():
  rng = np.random.default_rng(0)
  L, vocab, mask_id = 64, 500, 4
  n_masked = n_mask_tok = n_random = n_kept = 0
  for _ in range(3000):
    n = int(rng.integers(1, L - 2))
    seq = np.zeros(L, np.int32)
    seq[0], seq[n + 1] = 2, 3
    seq[1:n + 1] = rng.integers(5, vocab, size=n)
    masked, pos, lab, w = (a[0] for a in mask_batch(
        seq[None], np.array([n]), rng.random((1, L + 40)), mask_prob=0.15, max_predictions=20,
        mask_id=mask_id, vocab_size=vocab, random_token_low=5))
    real = pos[w > 0]
    assert np.all((real >= 1) & (real <= n))           # never [CLS] (0), [SEP] (n+1) or [PAD]
    assert np.all(masked[0] == 2) and masked[n + 1] == 3 and np.all(masked[n + 2:] == 0)
    np.testing.assert_array_equal(lab[w > 0], seq[real])
    assert len(set(real.tolist())) == len(real)
    n_masked += len(real)
    n_mask_tok += int(np.sum(masked[real] == mask_id))
    changed = (masked[real] != mask_id) & (masked[real] != seq[real])
    n_random += int(changed.sum())
    n_kept += int(np.sum(masked[real] == seq[real]))
  assert n_mask_tok / n_masked == pytest.approx(0.8, abs=0.02)
  # a random replacement can hit the original token (1/495): counted as kept
  assert n_random / n_masked == pytest.approx(0.1, abs=0.015)
  assert n_kept / n_masked == pytest.approx(0.1, abs=0.015)


def test_batch_layout_and_no_duplicate_sentences(pipe, tok):
  for step in range(5):
    b = pipe.batch(step)
    assert b["input_ids"].shape == (32, 2, 24) and b["mlm_positions"].shape == (32, 2, 6)
    assert np.all(b["input_ids"][:, :, 0] == tok.cls_id)
    lengths = b["attention_mask"].sum(-1)
    sep = np.take_along_axis(b["input_ids"], (lengths - 1)[..., None], axis=-1)[..., 0]
    assert np.all(sep == tok.sep_id)
    comps, idx, _, _ = pipe.resolve(step)
    meanings = [pipe.components[c].rows[int(i)] for c, i in zip(comps, idx)]  # corpus row
    assert len(set(meanings)) == 32                     # no meaning twice, in any language pair
    texts = [t for pair in pipe.texts_of(step) for t in pair]
    assert len(set(texts)) == 64                        # so no sentence twice in a batch
    langs = pipe.languages_of(step)
    assert all(a != b for a, b in langs)


def test_global_batch_is_independent_of_process_count(pipe):
  whole = pipe.batch(7)
  halves = [pipe.batch(7, process_index=i, process_count=2) for i in range(2)]
  quarters = [pipe.batch(7, process_index=i, process_count=4) for i in range(4)]
  for k in whole:
    np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]))
    np.testing.assert_array_equal(whole[k], np.concatenate([q[k] for q in quarters]))


def test_position_is_a_pure_function_of_step(pipe, tok):
  again = _embedded_pipeline(tok)
  for step in (0, 5, 123):
    a, b = pipe.batch(step), again.batch(step)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(pipe.batch(1)["input_ids"], pipe.batch(2)["input_ids"])


def test_one_tokenizer_loader_finds_each_layout(tok, tmp_path):
  """data.tokenizers.load: a .model file, a dir with spm.model, a workdir (tokenizer/spm.model),
  an HF tokenizer.json; anything else is one InputError line naming the path."""
  import shutil

  from bepa_jax.errors import InputError
  path = tok.model_path
  (tmp_path / "hf").mkdir()
  shutil.copy(path, tmp_path / "hf" / "spm.model")
  (tmp_path / "wd" / "tokenizer").mkdir(parents=True)
  shutil.copy(path, tmp_path / "wd" / "tokenizer" / "spm.model")
  for where in (path, tmp_path / "hf", tmp_path / "wd"):
    got = tokenizers_lib.load(str(where))
    assert got.encode_batch(["Guten Morgen"]) == tok.encode_batch(["Guten Morgen"]), where
  assert tokenizers_lib.find(str(tmp_path / "wd")) == (
      "spm", str(tmp_path / "wd" / "tokenizer" / "spm.model"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="empty: no tokenizer found") as e:
    tokenizers_lib.load(str(tmp_path / "empty"))
  assert "\n" not in str(e.value)
