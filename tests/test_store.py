"""The record store (data.cache_dir, data/store.py): the same batches as reading the sources,
reused without parsing or tokenising, and never reused for another corpus or tokenizer."""
import os

import numpy as np
import pytest

from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import factory, sources
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.errors import InputError
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
  texts = list(corpus_lib.load_embedded().texts())
  out = tmp_path_factory.mktemp("tok")
  return [tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(
      texts, str(out / str(v)), v)) for v in (400, 300)]


@pytest.fixture
def files(tmp_path):
  c = corpus_lib.load_embedded()
  for j, lang in enumerate(c.languages[:3]):
    (tmp_path / f"c.{lang}").write_text("".join(r[j] + "\n" for r in c.rows), encoding="utf-8")
  return tmp_path


def _cfg(files, cache=""):
  return tiny_config(**{"data.source": f"aligned:{files}/c.{{en,de,fr}}; embedded:en,ru@0.5",
                        "data.cache_dir": str(cache), "data.packing": True,
                        "data.max_length": 32, "model.max_position_embeddings": 64})


def _pipeline(cfg, tok):
  return factory.build_pipeline(cfg, tok, batch_shards=4)


def _stores(cache):
  return sorted(d for d in os.listdir(cache) if d.startswith("corpus-"))


def test_store_gives_the_same_batches_and_is_reused(files, toks, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  plain = _pipeline(_cfg(files), toks[0])
  built = _pipeline(_cfg(files, cache), toks[0])
  assert built.fingerprint() == plain.fingerprint() and built.rows == plain.rows
  want = {step: plain.batch(step) for step in (0, 5)}

  def refuse(*a, **k):
    raise AssertionError("parsed or tokenised again")
  monkeypatch.setattr(sources, "open_sources", refuse)       # reuse: nothing parsed ...
  monkeypatch.setattr(toks[0], "encode_batch", refuse)       # ... nor tokenised, per step too
  again = _pipeline(_cfg(files, cache), toks[0])
  for step, whole in want.items():
    halves = [again.batch(step, p, 2) for p in range(2)]
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([h[k] for h in halves]), k)
  assert plain.texts_of(3) == again.texts_of(3) and len(_stores(cache)) == 1
  monkeypatch.undo()
  import pickle   # a worker process gets the store's paths, not copies of its arrays
  loaded = pickle.loads(pickle.dumps(again))
  assert isinstance(loaded.plan.table.keys.base, np.memmap)
  assert isinstance(loaded.tokens.ids_flat.base, np.memmap)
  for k, v in loaded.batch(5).items():
    np.testing.assert_array_equal(v, want[5][k], k)


def test_a_changed_corpus_or_tokenizer_gets_its_own_store(files, toks, tmp_path):
  cache = tmp_path / "cache"
  first = _pipeline(_cfg(files, cache), toks[0])
  (key,) = _stores(cache)
  other_tok = _pipeline(_cfg(files, cache), toks[1])          # another tokenizer: re-tokenised
  assert sorted(os.listdir(cache / key)).count("meta.json") == 1
  assert len([d for d in os.listdir(cache / key) if d.startswith("tokens-")]) == 2
  assert other_tok.batch(0)["input_ids"].max() < 300 <= first.batch(0)["input_ids"].max()
  path = files / "c.de"
  lines = path.read_text(encoding="utf-8").splitlines()
  lines[0] = "Ein ganz anderer Satz."                          # one line of the corpus changed
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  changed = _pipeline(_cfg(files, cache), toks[0])
  assert len(_stores(cache)) == 2
  texts = {t for c in changed.components for i in range(len(c)) for t in c[i]}
  assert "Ein ganz anderer Satz." in texts


def test_a_damaged_store_is_refused(files, toks, tmp_path):
  cache = tmp_path / "cache"
  _pipeline(_cfg(files, cache), toks[0])
  (key,) = _stores(cache)
  meta = cache / key / "meta.json"
  text = meta.read_text()
  meta.write_text(text.replace(key[len("corpus-"):], "0" * 24))
  with pytest.raises(InputError, match=rf"{key} holds a corpus store for key 0+ .*delete it"):
    _pipeline(_cfg(files, cache), toks[0])
  meta.write_text(text)
  pairs = cache / key / "pairs.bin"
  pairs.write_bytes(pairs.read_bytes()[:-8])
  with pytest.raises(InputError, match=r"pairs.bin is missing or damaged"):
    _pipeline(_cfg(files, cache), toks[0])


def test_a_bucket_url_is_refused_by_the_config_pass():
  from bepa_jax.config import validate
  from bepa_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=r"data.cache_dir='gs://b/c': .*memory-mapped.*gcsfuse"):
    validate.validate(tiny_config(**{"data.cache_dir": "gs://b/c"}), 8)
