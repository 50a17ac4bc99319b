"""bench/input.py's logic without the long run: the pod table's cells and their demand per
host, projections and headroom, the last line, the enlarged corpus, and one tiny measurement
through a real data worker."""
import gzip
import json
import os
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import input as bench_input  # noqa: E402


def test_cells_are_the_pod_table_with_demand_per_host():
  table = json.load(open(os.path.join(REPO, "bench", "results", "aot_table.json")))
  cells = bench_input.cells(table)
  keys = {(r["config"], r["B"], r["slice"], r["layout"].split()[0]) for r in table["rows"]}
  assert len(cells) == len(keys) and len({c["name"] for c in cells}) == len(cells)
  assert {c["slice"]: c["hosts"] for c in cells} == {"v4-32": 4, "v5e-64": 16, "v5p-128": 16,
                                                     "v5e-256": 64}
  cell = next(c for c in cells if c["name"] == "base_B4096_v5e-64_packed")
  row = next(r for r in table["rows"] if (r["config"], r["B"], r["slice"], r["layout"]) ==
             ("base", 4096, "v5e-64", "packed"))
  assert cell["demand"] == pytest.approx(row["best"]["pairs_per_s"] / 16) and cell["shards"] == 64
  cell = next(c for c in cells if c["name"] == "xlmr_B32768_v5e-64_padded")  # a GradCache plan
  assert cell["micro"] == 4 and cell["demand"] > 0
  assert next(c for c in cells if c["B"] == 65536)["demand"] is None  # did not fit


def test_projection_headroom_and_the_last_line():
  cell = dict(name="a", slice="v5e-64", demand=1000.0, hosts=16, B=4096)
  rows = [bench_input.summarize(cell, 600.0, 500.0, 950.0),
          bench_input.summarize(dict(cell, name="b", slice="v5p-128", demand=4000.0), 900.0,
                                800.0, None),
          bench_input.summarize(dict(cell, name="c", demand=None), 500.0, 400.0, 700.0)]
  a = rows[0]
  assert a["projected"][8] == 4800.0 and a["headroom"][1] == pytest.approx(0.6)
  assert a["headroom_wall_1"] == pytest.approx(0.5) and a["workers_for_2x"] == 4
  assert a["scaling_2"] == pytest.approx(1.9) and rows[1]["scaling_2"] is None
  assert rows[2]["headroom"] is None
  assert bench_input.last_line(rows) == "min headroom 1.80x at b with 8 workers"
  assert bench_input.targets(rows) == ("targets: >= 2x with 8 workers on 1 of 2 cells; >= 1x "
                                       "on one core on 0 of 1 non-v5p cells")
  md = bench_input.markdown([dict(r, config="base", layout="packed") for r in rows]).splitlines()
  assert len(md) == 2 + len(rows) and md[2].endswith("| 0.60x | 4.80x | 4 |")
  assert md[4].endswith("| - | - | - |")


def test_enlarged_corpus_has_distinct_copies_in_every_language(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  for lang, lines in (("en", ["a dog", "a cat"]), ("de", ["ein Hund", "eine Katze"])):
    with gzip.open(src / f"train.{lang}.gz", "wt") as f:
      f.write("\n".join(lines) + "\n")
  out = bench_input.enlarge(str(src), str(tmp_path / "out"), copies=3, langs=("en", "de"))
  en = gzip.open(os.path.join(out, "train.en.gz"), "rt").read().splitlines()
  de = gzip.open(os.path.join(out, "train.de.gz"), "rt").read().splitlines()
  assert en == ["a dog", "a cat", "a dog (1)", "a cat (1)", "a dog (2)", "a cat (2)"]
  assert len(de) == len(en) and de[3] == "eine Katze (1)"


def test_one_cell_measured_through_a_worker(tmp_path):
  """A small cell on the bundled corpus: the wall and CPU rates of one worker are positive."""
  from bepa_jax.data import corpus, tokenizer
  tok = tokenizer.SentencePieceTokenizer(tokenizer.train_sentencepiece(
      corpus.load_embedded().texts(), str(tmp_path / "tok"), 400))
  cell = dict(config="base", B=64, slice="v5e-64", layout="packed", hosts=4, shards=8, micro=1)
  specs = bench_input.cell_specs(cell, "embedded")
  assert specs.data.max_length == 128 and specs.data.dedup and specs.data.packing
  m = bench_input.measure(specs, tok, cell, workers=1, steps=2, min_s=0.0)
  assert m["rows"] == 16 and m["pairs_per_s"] > 0 and m["cpu_pairs_per_s_per_worker"] > 0


def test_rescore_reads_todays_demand_and_keeps_the_rates():
  table = json.load(open(os.path.join(REPO, "bench", "results", "aot_table.json")))
  cell = next(c for c in bench_input.cells(table) if c["name"] == "base_B4096_v5e-64_packed")
  stale = bench_input.summarize(dict(cell, demand=cell["demand"] / 2), 3 * cell["demand"],
                                2 * cell["demand"], None)
  stale.update(source="x", measured={"1": {}})
  out = bench_input.rescore(dict(cells=[stale], e2e={"speedup": 1.1}))
  row = out["cells"][0]
  assert row["demand"] == pytest.approx(cell["demand"])
  assert row["demand_when_measured"] == pytest.approx(cell["demand"] / 2)
  assert row["headroom"][1] == pytest.approx(3.0) and row["headroom"][8] == pytest.approx(24.0)
  assert row["pairs_per_s_core"] == stale["pairs_per_s_core"] and out["e2e"] == {"speedup": 1.1}
  assert out["last_line"] == "min headroom 24.00x at base_B4096_v5e-64_packed with 8 workers"
  again = bench_input.rescore(out)["cells"][0]  # a second rescore keeps what was measured against
  assert again["demand_when_measured"] == pytest.approx(cell["demand"] / 2)


def test_match_puts_fresh_cells_in_place_and_keeps_the_rest():
  """--match measures some cells again (or cells the plan search has just made fit): they take
  their place in the pod table's order, and the stored rows of the other cells are kept."""
  table = json.load(open(os.path.join(REPO, "bench", "results", "aot_table.json")))
  names = [c["name"] for c in bench_input.cells(table)]
  stored = [dict(name=names[0], v="old"), dict(name=names[5], v="old")]
  fresh = [dict(name=names[5], v="new"), dict(name=names[2], v="new")]
  assert bench_input.merge(stored, fresh) == [dict(name=names[0], v="old"),
                                              dict(name=names[2], v="new"),
                                              dict(name=names[5], v="new")]


def test_docs_table_is_rewritten_between_its_markers_only(tmp_path):
  doc = tmp_path / "data.md"
  doc.write_text("intro\n<!-- input_table: note -->\nold\n<!-- /input_table -->\nafter\n")
  bench_input.write_doc("| new |", str(doc))
  assert doc.read_text() == ("intro\n<!-- input_table: note -->\n| new |\n"
                             "<!-- /input_table -->\nafter\n")
  (tmp_path / "none.md").write_text("no markers\n")
  with pytest.raises(SystemExit, match="no <!-- input_table"):
    bench_input.write_doc("| new |", str(tmp_path / "none.md"))
