"""bench/aot_table.py without compiling: its cells, the packed rows it asks bepa-compile for
(bepa-train's own probe), and the docs/pods.md block it rewrites."""
import json
import os
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import aot_table  # noqa: E402
import authors_step  # noqa: E402


def test_cells_padded_with_both_chunks_packed_once_and_names_unique():
  cells = aot_table.cells()
  padded = [c for c in cells if not c[4]]
  packed = [c for c in cells if c[4]]
  assert len(padded) == 2 * 2 * 2 * 4 + 1 and len(packed) == 2 * 2 * 4  # + the oversized check
  assert all(c[3] == 0 for c in packed)
  names = {aot_table.cell_name(*c, "full", 0) for c in cells}
  assert len(names) == len(cells)
  # padded names are those of the JSONs already in bench/results/aot
  assert aot_table.cell_name("base", 4096, "v5e-64", 0, False, "dots_saveable", 0) == \
      "base_B4096_v5e-64_chunk0_dots_saveable_gc0"
  assert cells.index(packed[0]) > cells.index(padded[-1])  # padded first


@pytest.fixture
def small_probe(tmp_path, monkeypatch):
  """The bundled corpus and a 400-piece tokenizer instead of Multi30k and 8000 pieces."""
  monkeypatch.setattr(authors_step, "MULTI30K", str(tmp_path / "no-multi30k"))
  monkeypatch.setattr(aot_table, "PROBE_VOCAB", 400)
  monkeypatch.setattr(aot_table, "PROBE_CACHE", str(tmp_path / "cache"))
  aot_table.probe.cache_clear()
  yield
  aot_table.probe.cache_clear()


def test_packed_cells_ask_for_the_rows_bepa_train_would_choose(small_probe):
  B, topo = 512, "v5e-64"  # 64 groups of 8 pairs (16 sentences)
  pr = aot_table.probe("base", B, 64, 1)
  assert pr["data"] == "bundled corpus en-de" and pr["sentences_per_group"] == 16
  assert 0 < pr["packed_rows"] < 16 and pr["tokens_per_sentence"] > 2
  args = aot_table.args_for("base", B, topo, 0, True, "dots_saveable", 0)
  assert f"--config.data.packed_rows={pr['packed_rows']}" in args
  assert "--config.data.packing=True" in args
  assert args[args.index("--tokens_per_sentence") + 1] == f"{pr['tokens_per_sentence']:.3f}"
  # GradCache chunks split a group further: rows for the chunk's share
  chunked = aot_table.probe("base", B, 64, 4)
  assert chunked["sentences_per_group"] == 4 and chunked["packed_rows"] <= pr["packed_rows"]
  padded = aot_table.args_for("base", B, topo, 0, False, "full", 0)
  assert "--config.data.packing=False" in padded and not any("packed_rows" in a for a in padded)


def test_docs_block_rewritten_between_its_markers_only(tmp_path):
  row = dict(config="base", B=4096, slice="v5e-64", layout="packed", contrastive_chunk=0,
             attempts=[], analytic_step_ms=91.0, analytic_mfu=0.5)
  page = tmp_path / "pods.md"
  page.write_text(f"before\n{aot_table.BEGIN} note -->\nold table\n{aot_table.END}\nafter\n")
  aot_table.write_doc({"rows": [row]}, str(page))
  text = page.read_text()
  assert text.startswith("before\n") and text.endswith(f"{aot_table.END}\nafter\n")
  assert "old table" not in text and "| config | B | slice | layout |" in text
  assert "Not compiled in the sessions' time (1 of 1 cells" in text
  assert "base 4096 v5e-64 packed chunk 0" in text
  (tmp_path / "bare.md").write_text("no block\n")
  with pytest.raises(SystemExit, match="no <!-- aot_table"):
    aot_table.write_doc({"rows": [row]}, str(tmp_path / "bare.md"))


def test_docs_page_holds_the_generated_table():
  """docs/pods.md's block is what `bench/aot_table.py --docs` writes from the stored results."""
  with open(aot_table.DOC, encoding="utf-8") as f:
    text = f.read()
  a, b = text.find(aot_table.BEGIN), text.find(aot_table.END)
  assert 0 <= a < b, f"{aot_table.DOC}: no generated table block"
  with open(os.path.join(REPO, "bench", "results", "aot_table.json")) as f:
    result = json.load(f)
  assert text[text.index("\n", a) + 1:b] == aot_table.doc_block(result) + "\n"


def test_a_compiler_crash_is_retried_with_rbg_dropout_then_the_ladder_goes_on(tmp_path, monkeypatch,
                                                                         small_probe):
  monkeypatch.setattr(aot_table, "OUT", str(tmp_path))
  cell = ("base", 4096, "v5e-256", 0, True)
  fits = lambda ok: {"memory": {"fits": ok, "total": 1.0}}
  outcome = {("dots_saveable", 0, False, False): {"failed": "crash"},
             ("dots_saveable", 0, False, True): fits(False),
             ("full", 0, False, False): fits(False),
             ("full", 0, True, False): {"failed": "rc -11"},   # fsdp
             ("full", 0, True, True): fits(True)}
  asked = []

  def compile_missing(name, remat, gc, fsdp, rbg):
    asked.append((remat, gc, fsdp, rbg))
    assert name == aot_table.attempt_name(cell, remat, gc, fsdp, rbg)
    return outcome[(remat, gc, fsdp, rbg)]

  made, done = aot_table.walk(cell, compile_missing)
  assert done and asked == list(outcome)  # each crash retried with rbg, then the next remat
  assert [(m["remat"], m["gc"], m["fsdp"], m["rbg"]) for m in made] == list(outcome)
  assert aot_table.cell_name(*cell, "full", 0) + "_fsdp_rbg" == \
      aot_table.attempt_name(cell, "full", 0, fsdp=True, rbg=True)
  args = aot_table.args_for(*cell[:4], False, "full", 0, fsdp=True, rbg=True)
  assert "--config.train.dropout_rng=rbg" in args
  assert "--config.mesh.data=1" in args and "--config.mesh.fsdp=-1" in args
  # without a compiler the walk stops at the first missing report
  made, done = aot_table.walk(cell)
  assert made == [] and not done
