"""Sources of parallel pairs (files the tests write, TFDS mock and a tiny real array_record
dataset), bad input handling, tokenizer loaders and the bepa-tokenizer CLI."""
import gzip
import io
import json
import os

import pytest

from bepa_jax.data import sources
from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.data import tokenizers as tokenizers_lib
from bepa_jax.errors import ConfigError, InputError
from conftest import SHARED_DATA


def write(path, lines, gz=False, raw=False):
  data = b"".join(l if raw else (l + "\n").encode() for l in lines)
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(data)
  return str(path)


def pairs_of(comps):
  return sorted(sources.iter_pairs(comps))


# ----------------------------------------------------------------------------- files
def test_aligned_plain_and_gzip_multiway(tmp_path):
  write(tmp_path / "train.en", ["a cat", "a dog", "", "the sun"])
  write(tmp_path / "train.de.gz", ["eine Katze", "ein Hund", "leer", "die Sonne"], gz=True)
  write(tmp_path / "train.fr", ["un chat", "un chien", "vide", ""])
  stats = sources.LoadStats()
  comps = sources.aligned_files(sources.expand_aligned(str(tmp_path / "train.{en,de,fr}")),
                                sources.TextPolicy(), stats)
  by = {(c.lang_x, c.lang_y): c for c in comps}
  assert set(by) == {("en", "de"), ("en", "fr"), ("de", "fr")}
  assert len(by["en", "de"]) == 3 and by["en", "de"][2] == ("the sun", "die Sonne")
  assert len(by["de", "fr"]) == 3 and len(by["en", "fr"]) == 2
  assert stats.empty == 2                              # counted per empty cell
  only = sources.aligned_files({"en": str(tmp_path / "train.en"),
                                "de": str(tmp_path / "train.de")}, sources.TextPolicy(),
                               sources.LoadStats(), pairs=[("de", "en")])
  assert [(c.lang_x, c.lang_y) for c in only] == [("en", "de")]


def test_tatoeba_layout(tmp_path):
  for l, (a, b) in {"deu": ("Hallo", "Hello"), "fra": ("Bonjour", "Hello")}.items():
    write(tmp_path / f"tatoeba.{l}-eng.{l}", [a, a + "!"])
    write(tmp_path / f"tatoeba.{l}-eng.eng", [b, b + "!"])
  comps, weights, _ = sources.open_sources(f"tatoeba:{tmp_path}:deu@2")
  assert [(c.lang_x, c.lang_y, len(c)) for c in comps] == [("deu", "eng", 2)] and weights == [2]
  comps, _, _ = sources.open_sources(f"tatoeba:{tmp_path}")
  assert [c.lang_x for c in comps] == ["deu", "fra"]


def test_tsv_multiway_and_per_line_pairs(tmp_path):
  write(tmp_path / "m.tsv", ["en\tde", "one\teins", "two\tzwei"])
  write(tmp_path / "p.tsv", ["lang_x\ttext_x\tlang_y\ttext_y", "en\tone\tde\teins",
                             "en\ttwo\tfr\tdeux", "en\tthree\tde\tdrei"])
  comps, _, _ = sources.open_sources(f"tsv:{tmp_path / 'm.tsv'}; tsv:{tmp_path / 'p.tsv'}")
  assert pairs_of(comps) == sorted([("en", "one", "de", "eins"), ("en", "two", "de", "zwei"),
                                    ("en", "one", "de", "eins"), ("en", "two", "fr", "deux"),
                                    ("en", "three", "de", "drei")])
  write(tmp_path / "bad.tsv", ["en\tde", "one\teins", "two"])
  with pytest.raises(InputError, match=r"bad.tsv:3: expected 2 tab-separated fields"):
    sources.open_sources(f"tsv:{tmp_path / 'bad.tsv'}")


def test_jsonl_pairs_and_multiway_objects(tmp_path):
  write(tmp_path / "a.jsonl", [
      json.dumps({"lang_x": "en", "text_x": "hi", "lang_y": "de", "text_y": "hallo"}),
      json.dumps({"en": "cat", "de": "Katze", "fr": "chat"}), ""])
  comps, _, stats = sources.open_sources(f"jsonl:{tmp_path / 'a.jsonl'}")
  assert pairs_of(comps) == sorted([("en", "hi", "de", "hallo"), ("en", "cat", "de", "Katze"),
                                    ("en", "cat", "fr", "chat"), ("de", "Katze", "fr", "chat")])
  assert stats.empty == 1
  write(tmp_path / "b.jsonl", ['{"en": "x", "de": '])
  with pytest.raises(InputError, match=r"b.jsonl:1: invalid JSON"):
    sources.open_sources(f"jsonl:{tmp_path / 'b.jsonl'}")


def test_monolingual_source(tmp_path):
  write(tmp_path / "mono.txt", ["s1", "s2", "s3", "s4", ""])
  comps, _, _ = sources.open_sources(f"mono:en={tmp_path / 'mono.txt'}")
  assert len(comps[0]) == 2 and comps[0][0] == ("s1", "s3") and comps[0].monolingual


def test_big_plain_files_are_indexed_not_loaded(tmp_path, monkeypatch):
  write(tmp_path / "t.en", ["a cat", "", "x" * 30, b"bad \xff".decode("latin-1"), "sun"])
  (tmp_path / "t.de").write_bytes(b"Katze\nleer\nlang\nschlecht\nSonne")  # no final newline
  spec = f"aligned:{tmp_path}/t.{{en,de}}"
  eager, _, _ = sources.open_sources(spec, sources.TextPolicy(max_chars=20))
  monkeypatch.setattr(sources, "LAZY_BYTES", 0)
  comps, _, _ = sources.open_sources(spec, sources.TextPolicy(max_chars=20))
  c = comps[0]
  assert isinstance(c, sources.LazyColumnPair) and len(c) == 5
  assert [c[i] for i in range(5)] == [("a cat", "Katze"), None, None,
                                      ("bad \u00ff", "schlecht"), ("sun", "Sonne")]
  assert (c.stats.empty, c.stats.long_skipped) == (1, 1)   # counted when read
  assert pairs_of(comps) == pairs_of(eager)
  (tmp_path / "u.en").write_bytes(b"ok\nbad \xff\n")
  (tmp_path / "u.de").write_bytes(b"gut\nschlecht\n")
  u, _, _ = sources.open_sources(f"aligned:{tmp_path}/u.{{en,de}}")
  with pytest.raises(InputError, match=r"u.en:2: invalid UTF-8"):
    u[0][1]
  u, _, _ = sources.open_sources(f"aligned:{tmp_path}/u.{{en,de}}",
                                 sources.TextPolicy(invalid_utf8="skip"))
  assert u[0][1] is None and u[0].stats.invalid_utf8 == 1
  write(tmp_path / "v.en", ["a", "b"])
  write(tmp_path / "v.de", ["a"])
  with pytest.raises(InputError, match="v.en has 2 lines, .*v.de has 1"):
    sources.open_sources(f"aligned:{tmp_path}/v.{{en,de}}")


@pytest.mark.parametrize("lazy", [False, True])
def test_nul_bytes_are_dropped_and_counted_eager_and_indexed(tmp_path, monkeypatch, caplog, lazy):
  """A NUL inside a line is dropped from its text (never a tokenizer piece of its own), the
  same whether the file is loaded or indexed; the lines are counted once, per file."""
  write(tmp_path / "n.en", ["a\x00 cat", "sun", "\x00\x00moon\x00", "\x00"])
  write(tmp_path / "n.de", ["Katze", "Sonne", "Mond", "leer"])
  monkeypatch.setattr(sources, "LAZY_BYTES", 0 if lazy else sources.LAZY_BYTES)
  with caplog.at_level("WARNING", logger="bepa"):
    comps, _, stats = sources.open_sources(f"aligned:{tmp_path}/n.{{en,de}}")
  assert pairs_of(comps) == [("en", "a cat", "de", "Katze"), ("en", "moon", "de", "Mond"),
                             ("en", "sun", "de", "Sonne")]   # the NUL-only line: empty, dropped
  assert stats.nul_lines == 3 and "3 lines cleared of NUL bytes" in stats.report()
  assert [r.getMessage() for r in caplog.records] == [
      f"{tmp_path}/n.en: 3 line(s) hold NUL bytes: the NULs are dropped from the text"]


# ----------------------------------------------------------------------------- bad input
def one_line(e):
  msg = str(e.value)
  assert "\n" not in msg and msg
  return msg


def test_missing_file_and_length_mismatch(tmp_path):
  with pytest.raises(InputError) as e:
    sources.open_sources(f"aligned:{tmp_path}/nope.{{en,de}}")
  assert f"file not found: {tmp_path}/nope.en" == one_line(e)
  write(tmp_path / "t.en", ["a", "b", "c"])
  write(tmp_path / "t.de", ["a", "b"])
  with pytest.raises(InputError) as e:
    sources.open_sources(f"aligned:{tmp_path}/t.{{en,de}}")
  msg = one_line(e)
  assert "t.en has 3 lines" in msg and "t.de has 2" in msg


def test_long_and_empty_lines_skip_or_truncate(tmp_path):
  write(tmp_path / "t.en", ["short", "x" * 50, "", "ok"])
  write(tmp_path / "t.de", ["kurz", "y", "leer", "gut"])
  spec = f"aligned:{tmp_path}/t.{{en,de}}"
  comps, _, stats = sources.open_sources(spec, sources.TextPolicy(max_chars=10))
  assert len(comps[0]) == 2 and (stats.long_skipped, stats.empty) == (1, 1)
  comps, _, stats = sources.open_sources(spec, sources.TextPolicy(10, long_lines="truncate"))
  assert comps[0][1] == ("x" * 10, "y") and stats.long_truncated == 1
  assert "1 long truncated" in stats.report() and "1 empty" in stats.report()


def test_invalid_utf8_error_or_skip(tmp_path):
  write(tmp_path / "t.en", [b"good\n", b"bad \xff\xfe\n", b"fine\n"], raw=True)
  write(tmp_path / "t.de", ["gut", "schlecht", "prima"])
  spec = f"aligned:{tmp_path}/t.{{en,de}}"
  with pytest.raises(InputError) as e:
    sources.open_sources(spec)
  assert one_line(e).startswith(f"{tmp_path}/t.en:2: invalid UTF-8")
  comps, _, stats = sources.open_sources(spec, sources.TextPolicy(invalid_utf8="skip"))
  assert len(comps[0]) == 2 and stats.invalid_utf8 == 1


def test_bad_specs_and_policy(tmp_path):
  for spec, pattern in [("ftp:x", "KIND:ARG"), ("", "empty"), (f"aligned:{tmp_path}/x", "PREFIX"),
                        ("mono:nolang", "mono:LANG=PATH")]:
    with pytest.raises(ConfigError, match=pattern):
      sources.open_sources(spec)
  with pytest.raises(ConfigError, match="data.long_lines"):
    sources.TextPolicy(long_lines="cut")
  with pytest.raises(ConfigError, match="data.pairs entry"):
    sources.parse_pairs("ende")
  write(tmp_path / "c.gz", [b"not gzip at all\n"], raw=True)
  with pytest.raises(InputError, match="c.gz: cannot read"):
    sources.read_lines(str(tmp_path / "c.gz"), sources.TextPolicy())


# ----------------------------------------------------------------------------- TFDS
try:
  import tensorflow_datasets as tfds
except ImportError:  # the [tfds] extra is not installed: only these tests skip
  tfds = None
needs_tfds = pytest.mark.skipif(tfds is None, reason="tensorflow-datasets not installed")


@needs_tfds
@pytest.mark.parametrize("name,langs", [
    ("para_crawl/enmt", {("en", "mt")}),
    ("tatoeba/tatoeba_de", {("de", "en")}),
    ("xnli", {("de", "en"), ("en", "fr"), ("de", "fr")}),   # in the source's language order
])
def test_tfds_mock_builders(name, langs):
  from bepa_jax.data import tfds_sources
  pairs = [("en", "de"), ("en", "fr"), ("de", "fr")] if name == "xnli" else None
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    comps = tfds_sources.tfds_components(name, "train", sources.TextPolicy(), pairs=pairs)
    assert {(c.lang_x, c.lang_y) for c in comps} == langs
    for c in comps:
      assert len(c) == 7
      got = [c[i] for i in range(len(c))]
      assert all(p is None or (isinstance(p[0], str) and isinstance(p[1], str)) for p in got)
  import sys
  assert "tensorflow" not in sys.modules                  # no TensorFlow anywhere


@needs_tfds
def test_tfds_ted_multi_variable_languages():
  from bepa_jax.data import tfds_sources
  records = [{"talk_name": b"t", "translations": {"language": [b"en", b"de", b"fr"],
                                                   "translation": [b"hi", b"hallo", b"salut"]}},
             {"talk_name": b"t", "translations": {"language": [b"en", b"fr"],
                                                   "translation": [b"bye", b"au revoir"]}}]
  with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ConfigError, match="data.pairs"):
      tfds_sources.tfds_components("ted_multi_translate", "train", sources.TextPolicy())
    comps = tfds_sources.tfds_components("ted_multi_translate", "train", sources.TextPolicy(),
                                         pairs=[("fr", "en"), ("en", "de")])
  got = {(c.lang_x, c.lang_y): [c[i] for i in range(len(c))] for c in comps}
  assert got == {("fr", "en"): [("salut", "hi"), ("au revoir", "bye")],
                 ("en", "de"): [("hi", "hallo")]}


@needs_tfds
def test_tfds_real_array_record_and_errors(tmp_path):
  from bepa_jax.data import tfds_sources

  class TinyPairs(tfds.core.GeneratorBasedBuilder):
    """A real (not mocked) array_record dataset, prepared offline: checks split errors."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.Translation(
          languages=("de", "en")))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(6):
        yield i, {"en": f"hello {i}", "de": f"hallo {i}"}

  TinyPairs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  comps, _, _ = sources.open_sources("tfds:tiny_pairs:train", tfds_data_dir=str(tmp_path))
  assert sorted(comps[0][i] for i in range(6)) == [(f"hallo {i}", f"hello {i}") for i in range(6)]
  with pytest.raises(InputError) as e:
    tfds_sources.open_data_source("tiny_pairs", "test", str(tmp_path))
  assert one_line(e) == "TFDS dataset 'tiny_pairs' has no split 'test' (has train)"
  with pytest.raises(InputError) as e:
    tfds_sources.open_data_source("no_such_dataset_xyz", "train", str(tmp_path))
  assert "unknown TFDS dataset 'no_such_dataset_xyz'" in one_line(e)
  with pytest.raises(InputError) as e:
    tfds_sources.open_data_source("para_crawl/enmt", "train", str(tmp_path / "empty"))
  assert "is not prepared as array_record" in one_line(e)
  with pytest.raises(InputError) as e:
    tfds_sources.open_data_source("para_crawl/xxzz", "train", str(tmp_path))
  assert "para_crawl/xxzz" in one_line(e)


# ----------------------------------------------------------------------------- tokenizers
def _raw_spm(tmp_path):
  import sentencepiece as spm
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lib.load_embedded().texts()),
                                 model_writer=buf, vocab_size=300, minloglevel=2,
                                 character_coverage=0.9995)   # default layout: unk=0 <s>=1 </s>=2
  path = tmp_path / "xlmr.model"
  path.write_bytes(buf.getvalue())
  return str(path), spm.SentencePieceProcessor(model_file=str(path))


def test_xlmr_fairseq_layout(tmp_path):
  path, sp = _raw_spm(tmp_path)
  tok = tokenizers_lib.load(path, "xlmr_spm")
  assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size == sp.get_piece_size() + 2 and tok.mask_id == tok.vocab_size - 1
  text = "The weather is nice today ☃"
  ids = tok.encode_batch([text])[0]
  expect = [3 if i == sp.unk_id() else i + 1 for i in sp.encode(text)]
  assert ids == expect and 3 in ids
  assert tok.decode(ids).startswith("The weather is nice today")


def test_hf_tokenizer_json_wordpiece(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import models, normalizers, pre_tokenizers, trainers
  hf = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  hf.normalizer = normalizers.BertNormalizer(lowercase=False)
  hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  hf.train_from_iterator(corpus_lib.load_embedded().texts(), trainers.WordPieceTrainer(
      vocab_size=500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
  hf.save(str(tmp_path / "tokenizer.json"))
  tok = tokenizers_lib.load(str(tmp_path), "hf_json")
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  ids = tok.encode_batch(["The weather is nice", "Die Katze"])
  assert ids[0] == hf.encode("The weather is nice", add_special_tokens=False).ids
  assert tok.decode(ids[0]).replace(" ##", "") == "The weather is nice"
  with pytest.raises(InputError, match="tokenizer.json not found"):
    tokenizers_lib.load(str(tmp_path / "nope"), "hf_json")
  with pytest.raises(ConfigError, match="tokenizer.kind"):
    tokenizers_lib.load("x", "bpe")


def test_bepa_tokenizer_cli(tmp_path, capsys):
  from bepa_jax.cli import tokenizer as tokenizer_cli
  c = corpus_lib.load_embedded()
  write(tmp_path / "c.en", [r[0] for r in c.rows])
  write(tmp_path / "c.de.gz", [r[1] for r in c.rows], gz=True)
  out = tmp_path / "tok"
  assert tokenizer_cli.main(["train", "--input", f"aligned:{tmp_path}/c.{{en,de}}",
                             "--vocab-size", "300", "--model-type", "bpe", "--out",
                             str(out)]) == 0
  tok = tokenizer_lib.SentencePieceTokenizer(str(out / "spm.model"))
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert "1 language pairs" in capsys.readouterr().out
  assert tokenizer_cli.main(["train", "--input", f"tsv:{tmp_path}/none.tsv", "--vocab-size",
                             "300", "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err == f"bepa-tokenizer: error: file not found: {tmp_path}/none.tsv\n"
  # a vocabulary larger than the text supports is written smaller, and said so
  big = tmp_path / "big"
  assert tokenizer_cli.main(["train", "--input", f"aligned:{tmp_path}/c.{{en,de}}",
                             "--vocab-size", "100000", "--out", str(big)]) == 0
  n = tokenizer_lib.SentencePieceTokenizer(str(big / "spm.model")).vocab_size
  err = capsys.readouterr().err
  assert n < 100000 and err == (f"bepa-tokenizer: warning: asked for 100000 pieces, the text "
                                f"supports {n}: wrote {n} (give more text or a smaller "
                                f"--vocab-size)\n")
  (tmp_path / "a_file").write_text("x")
  assert tokenizer_cli.main(["train", "--input", f"aligned:{tmp_path}/c.{{en,de}}",
                             "--vocab-size", "300", "--out", str(tmp_path / "a_file")]) == 2
  err = capsys.readouterr().err
  assert err == f"bepa-tokenizer: error: --out {tmp_path}/a_file: exists and is not a directory\n"
  assert (tmp_path / "a_file").read_text() == "x"  # nothing overwritten


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "tatoeba")),
                    reason="shared data absent")
def test_real_tatoeba_reads():
  comps, _, stats = sources.open_sources(
      f"tatoeba:{os.path.join(SHARED_DATA, 'tatoeba')}:deu,fra")
  assert [len(c) for c in comps] == [1000, 1000]
