"""Evaluation metrics against hand-computed values; readers and diagnostics on small inputs."""
import math

import numpy as np
import pytest

from bepa_jax.errors import InputError
from bepa_jax.eval import diagnostics, metrics, retrieval, suite


# ----------------------------------------------------------------------------- spectrum
@pytest.mark.parametrize("spectrum, expected", [
    ([1.0, 1.0, 1.0, 1.0], 4.0),              # flat: full rank
    ([5.0, 0.0, 0.0], 1.0),                   # one direction
    ([2.0, 1.0, 1.0], 2 ** 1.5),              # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
    ([0.0, 0.0], 0.0),                        # nothing at all
])
def test_effective_rank_of_known_spectra(spectrum, expected):
  assert metrics.effective_rank_of_spectrum(spectrum) == pytest.approx(expected)


def test_effective_rank_and_pc1_of_a_known_matrix():
  # Centred columns [3,-3,0,0] and [0,0,1,-1] (+ an offset that centring removes):
  # singular values 3*sqrt(2), sqrt(2) -> p = (3/4, 1/4); PC1 share = 18 / (18 + 2).
  x = np.array([[3, 0], [-3, 0], [0, 1], [0, -1]], float) + np.array([10.0, -7.0])
  s = metrics.singular_values(x)
  np.testing.assert_allclose(s, [3 * math.sqrt(2), math.sqrt(2)], atol=1e-12)
  expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
  assert metrics.effective_rank(x) == pytest.approx(expected)
  assert metrics.pc1_share(x) == pytest.approx(0.9)
  # All rows equal: a fully collapsed space has nothing left after centring.
  assert metrics.effective_rank(np.ones((5, 3))) == 0.0


# ----------------------------------------------------------------------------- Wang & Isola
def test_alignment_of_known_points():
  zx = np.array([[2.0, 0.0], [0.0, 3.0]])     # normalised inside: e1, e2
  zy = np.array([[0.0, 1.0], [0.0, 0.5]])     # e2, e2
  # ||e1 - e2||^2 = 2, ||e2 - e2||^2 = 0 -> mean 1
  assert metrics.alignment(zx, zy) == pytest.approx(1.0)
  assert metrics.alignment(zx, zx) == pytest.approx(0.0)


def test_uniformity_of_known_points():
  # Antipodal pair: ||u - v||^2 = 4 -> log exp(-2 * 4) = -8.
  assert metrics.uniformity(np.array([[1.0, 0.0], [-3.0, 0.0]])) == pytest.approx(-8.0)
  # +-e1, +-e2: 4 adjacent pairs at squared distance 2, 2 opposite pairs at 4.
  z = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], float)
  expected = math.log((4 * math.exp(-4) + 2 * math.exp(-8)) / 6)
  assert metrics.uniformity(z) == pytest.approx(expected)
  # Identical points: every potential is 1 -> log 1 = 0 (the worst value).
  assert metrics.uniformity(np.ones((3, 2))) == pytest.approx(0.0, abs=1e-12)


def test_pair_vs_random_cosine_and_gap():
  zx = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  zy = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
  # diag: 1, 1, -1 -> 1/3. off-diagonal: (0, -1/sqrt2, 0, -1/sqrt2, 1/sqrt2, 1/sqrt2) -> 0
  stats = metrics.pair_cosine_stats(zx, zy)
  assert stats["pair_cos"] == pytest.approx(1 / 3)
  assert stats["random_cos"] == pytest.approx(0.0, abs=1e-12)
  assert stats["gap"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- retrieval
def test_top1_accuracy_on_a_constructed_similarity_matrix():
  sim = np.array([[0.9, 0.1, 0.0],    # row 0 -> col 0 (right)
                  [0.2, 0.3, 0.8],    # row 1 -> col 2 (wrong)
                  [0.1, 0.4, 0.7]])   # row 2 -> col 2 (right)
  # columns: col 0 -> row 0 (right), col 1 -> row 2 (wrong), col 2 -> row 1 (wrong)
  acc = metrics.top1_accuracy(sim)
  assert acc == {"x2y": pytest.approx(2 / 3), "y2x": pytest.approx(1 / 3)}
  assert metrics.top1_accuracy(np.eye(4)) == {"x2y": 1.0, "y2x": 1.0}
  with pytest.raises(ValueError, match="square"):
    metrics.top1_accuracy(np.zeros((2, 3)))


def test_margin_scores_by_hand():
  sim = np.array([[0.9, 0.5], [0.85, 0.6]])
  # k=1: r_x = row maxima (0.9, 0.85), r_y = column maxima (0.9, 0.6)
  ratio = metrics.margin_scores(sim, k=1, mode="ratio")
  np.testing.assert_allclose(ratio, [[0.9 / 0.9, 0.5 / 0.75], [0.85 / 0.875, 0.6 / 0.725]])
  dist = metrics.margin_scores(sim, k=1, mode="distance")
  np.testing.assert_allclose(dist, [[0.0, 0.5 - 0.75], [0.85 - 0.875, 0.6 - 0.725]])
  with pytest.raises(ValueError, match="margin mode"):
    metrics.margin_scores(sim, mode="cosine")


def test_ratio_margin_demotes_a_hub():
  # y0 is close to every x: plain cosine sends x1 and x2 to it.
  sim = np.array([[0.9, 0.2, 0.1],
                  [0.8, 0.7, 0.1],
                  [0.8, 0.1, 0.7]])
  assert metrics.top1_accuracy(sim)["x2y"] == pytest.approx(1 / 3)
  # k=2: r_x = (.55, .75, .75), r_y = (.85, .45, .40); row 1: .8/.8 = 1.0 < .7/.6 = 1.167;
  # row 2: .8/.8 = 1.0 < .7/.575 = 1.217; row 0: .9/.7 = 1.286 is the largest.
  scores = metrics.margin_scores(sim, k=2)
  assert scores[1, 1] == pytest.approx(0.7 / 0.6) and scores[2, 2] == pytest.approx(0.7 / 0.575)
  assert metrics.top1_accuracy(scores)["x2y"] == 1.0


def test_retrieval_accuracy_from_embeddings():
  rng = np.random.default_rng(0)
  zx = rng.normal(size=(50, 16))
  zy = 3.0 * zx + 0.01 * rng.normal(size=zx.shape)  # scale does not matter for cosine
  assert metrics.retrieval_accuracy(zx, zy) == {"x2y": 1.0, "y2x": 1.0}
  assert metrics.retrieval_accuracy(zx, zy, margin="ratio") == {"x2y": 1.0, "y2x": 1.0}
  shuffled = metrics.retrieval_accuracy(zx, zy[::-1])
  assert shuffled["x2y"] <= 0.04 and shuffled["y2x"] <= 0.04


# ----------------------------------------------------------------------------- readers
def _write(path, lines):
  path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
  return str(path)


def test_tatoeba_reader_and_errors(tmp_path):
  _write(tmp_path / "tatoeba.deu-eng.deu", ["Hallo", "Welt", "Haus"])
  _write(tmp_path / "tatoeba.deu-eng.eng", ["Hello", "World", "House"])
  _write(tmp_path / "tatoeba.fra-eng.fra", ["Bonjour", "Monde"])
  _write(tmp_path / "tatoeba.fra-eng.eng", ["Hello"])
  assert retrieval.tatoeba_languages(str(tmp_path)) == ["deu", "fra"]
  ps = retrieval.read_tatoeba(str(tmp_path), "deu", max_sentences=2)
  assert ps.languages == ("deu", "eng") and ps.texts == (("Hallo", "Welt"), ("Hello", "World"))
  with pytest.raises(InputError, match=r"tatoeba\.fra-eng\.eng: 1 lines.*line-aligned"):
    retrieval.read_tatoeba(str(tmp_path), "fra")
  with pytest.raises(InputError, match="no Tatoeba file for language 'xyz'"):
    retrieval.read_tatoeba(str(tmp_path), "xyz")


def test_parallel_reader_gz_and_language_names(tmp_path):
  import gzip
  with gzip.open(tmp_path / "test.de.gz", "wt", encoding="utf-8") as f:
    f.write("ein Hund\nzwei Katzen\n")
  en = _write(tmp_path / "test.en", ["a dog", "two cats"])
  ps = retrieval.read_parallel([str(tmp_path / "test.de.gz"), en])
  assert ps.languages == ("de", "en") and ps.texts[0] == ("ein Hund", "zwei Katzen")
  with pytest.raises(InputError, match="file not found"):
    retrieval.read_parallel([en, str(tmp_path / "missing.fr")])


# ----------------------------------------------------------------------------- suite
def _fake_sets(n=30, d=8, seed=0):
  """Two aligned sets whose 'embeddings' are near-copies across languages."""
  rng = np.random.default_rng(seed)
  sets, embs = [], []
  for name, langs in (("tatoeba/deu", ("deu", "eng")), ("parallel", ("de", "en", "fr"))):
    base = rng.normal(size=(n, d))
    ps = retrieval.ParallelSet(name, langs, tuple(tuple(f"{l}{i}" for i in range(n))
                                                  for l in langs))
    emb = {l: {"cls": base + 0.05 * rng.normal(size=base.shape),
               "mean": rng.normal(size=base.shape)} for l in langs}
    sets.append(ps)
    embs.append(emb)
  return sets, embs


def test_diagnostics_and_scores_on_aligned_embeddings(tmp_path):
  sets, embs = _fake_sets()
  report, plot = diagnostics.compute(sets, embs, ("cls", "mean"), map_per_lang=10)
  cls, mean = report["cls"], report["mean"]
  assert cls["gap"] > 0.8 and abs(mean["gap"]) < 0.1        # aligned vs unrelated
  assert cls["alignment"] < 0.05 < mean["alignment"]
  assert set(cls["pairs"]) == {"deu-eng", "de-en", "de-fr", "en-fr"}
  assert 1.0 < cls["effective_rank"] <= 8.0 and 0.0 < cls["pc1_share"] < 1.0
  assert plot["cls"]["map_points"].shape == (50, 8)          # 10 per language, 5 languages
  scores = retrieval.score_set(sets[1], embs[1], ("cls",), margin="ratio")
  assert scores["de-fr"]["cls"] == {"de->fr": 1.0, "fr->de": 1.0}
  assert "cls+ratio" in scores["de-fr"]
  paths = diagnostics.save_plots({"a": plot["cls"], "b": plot["mean"]}, str(tmp_path), tsne=False)
  assert [p.rsplit("/", 1)[1] for p in paths] == ["spectrum.png", "map.png",
                                                   "similarity_hist.png"]
  assert all((tmp_path / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in paths)


def test_suite_with_a_fake_embedder():
  sets, embs = _fake_sets()
  table = {}
  for ps, emb in zip(sets, embs):
    for lang, texts in zip(ps.languages, ps.texts):
      for i, t in enumerate(texts):
        table[t] = (emb[lang]["cls"][i], emb[lang]["mean"][i])
  embedder = lambda texts: {"cls": np.stack([table[t][0] for t in texts]),
                            "mean": np.stack([table[t][1] for t in texts])}
  report, _ = suite.run(embedder, sets, poolings=("cls", "mean"))
  avg = report["retrieval"]["tatoeba_average"]
  assert avg["cls"] == {"xx->eng": 1.0, "eng->xx": 1.0} and avg["mean"]["xx->eng"] < 0.3
  flat = suite.flatten(report)
  assert flat["retrieval/tatoeba_average/cls/xx_to_eng"] == 1.0
  assert flat["retrieval/parallel/de-en/cls/de_to_en"] == 1.0
  assert "diagnostics/cls/effective_rank" in flat
  md = suite.markdown({"m1": report, "m2": report})
  assert "| | m1 | m2 |" in md and "tatoeba average xx->eng (cls)" in md


def test_tatoeba_from_tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  from bepa_jax.eval import suite
  records = [{"source_sentence": f"Satz {i}".encode(), "target_sentence": f"sentence {i}".encode(),
              "source_language": b"de", "target_language": b"en"} for i in range(5)]
  with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    sets = suite.load_sets("tfds", ["de"], max_sentences=4)
  assert len(sets) == 1 and sets[0].name == "tatoeba/de"
  assert sets[0].languages == ("de", "en")
  assert sets[0].texts == (tuple(f"Satz {i}" for i in range(4)),
                           tuple(f"sentence {i}" for i in range(4)))
