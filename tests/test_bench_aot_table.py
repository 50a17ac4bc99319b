"""bench/aot_table.py without compiling: its cells, the packed rows it asks bepa-compile for
(bepa-train's own probe), and the docs/pods.md block it rewrites."""
import dataclasses
import json
import os
import sys

import pytest

from bepa_jax.aot import search as search_lib
from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import aot_table  # noqa: E402
import aot_table_doc  # noqa: E402
import authors_step  # noqa: E402


def test_cells_padded_and_packed_the_targets_searched_first_and_names_unique():
  cells = aot_table.cells()
  assert len(cells) == 2 * 2 * 2 * 4 + 1  # config x B x layout x slice + the oversized check
  assert len({aot_table.cell_label(c) for c in cells}) == len(cells)
  order = aot_table.search_order()
  assert order[:len(aot_table.PRIORITY)] == aot_table.PRIORITY
  assert sorted(order) == sorted(c for c in cells if c != aot_table.OVERSIZED)
  # the earlier table's reports keep their names: they are plans of this one's search
  name = aot_table.old_name(("base", 4096, "v5e-64", False), 0, "dots_saveable", 0, False, False)
  assert name == "base_B4096_v5e-64_chunk0_dots_saveable_gc0"
  assert os.path.exists(os.path.join(aot_table.OUT, name + ".json"))


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
  plan = search_lib.Plan("dots_saveable", "zero1", scan_layers=False)
  args = aot_table.args_for(("base", B, topo, True), plan)
  assert f"--config.data.packed_rows={pr['packed_rows']}" in args
  assert "--config.data.packing=True" in args
  assert args[args.index("--tokens_per_sentence") + 1] == f"{pr['tokens_per_sentence']:.3f}"
  assert all(o in args for o in plan.overrides())  # the plan's settings, every one
  # GradCache chunks split a group further: rows for the chunk's share
  chunked = aot_table.probe("base", B, 64, 4)
  assert chunked["sentences_per_group"] == 4 and chunked["packed_rows"] <= pr["packed_rows"]
  gc = dataclasses.replace(plan, remat="full", gradcache_chunks=4)
  assert f"--config.data.packed_rows={chunked['packed_rows']}" in aot_table.args_for(
      ("base", B, topo, True), gc)
  padded = aot_table.args_for(("base", B, topo, False), plan)
  assert "--config.data.packing=False" in padded and not any("packed_rows" in a for a in padded)


def test_docs_block_rewritten_between_its_markers_only(tmp_path):
  row = dict(config="base", B=4096, slice="v5e-64", layout="packed", tried=[],
             search="partial: 2 new plan(s), 3 not compiled")
  other = dict(row, slice="v4-32", search="today's plan only: 5 plan(s) not compiled")
  page = tmp_path / "pods.md"
  page.write_text(f"before\n{aot_table_doc.BEGIN} note -->\nold table\n{aot_table_doc.END}\nafter\n")
  aot_table_doc.write_doc({"rows": [row, other], "targets": []}, str(page))
  text = page.read_text()
  assert text.startswith("before\n") and text.endswith(f"{aot_table_doc.END}\nafter\n")
  assert "old table" not in text and "| config | B | slice | layout | plan |" in text
  assert "Searched in part (1 of 2 cells" in text and "): base 4096 v5e-64 packed." in text
  assert "today's plan from the earlier table's reports: 1 cells" in text
  (tmp_path / "bare.md").write_text("no block\n")
  with pytest.raises(SystemExit, match="no <!-- aot_table"):
    aot_table_doc.write_doc({"rows": [row], "targets": []}, str(tmp_path / "bare.md"))


def test_docs_page_holds_the_generated_table():
  """docs/pods.md's block is what `bench/aot_table.py --docs` writes from the stored results."""
  with open(aot_table_doc.DOC, encoding="utf-8") as f:
    text = f.read()
  a, b = text.find(aot_table_doc.BEGIN), text.find(aot_table_doc.END)
  assert 0 <= a < b, f"{aot_table_doc.DOC}: no generated table block"
  with open(os.path.join(REPO, "bench", "results", "aot_table.json")) as f:
    result = json.load(f)
  assert text[text.index("\n", a) + 1:b] == aot_table_doc.doc_block(result) + "\n"


def report(step_ms, gib=2.0):
  return {"memory": {"fits": gib <= 16, "total": gib * 2 ** 30, "hbm": 16 * 2 ** 30},
          "time": {"step_s": step_ms / 1e3, "bound": "HBM"}, "pairs_per_s": 1.0}


def test_the_earlier_tables_reports_are_plans_of_the_search(tmp_path, monkeypatch):
  """Reports on disk, of the earlier ladder or of this search, are never compiled again;
  today's plan is the ladder's first fit (a crash retried with rbg), the best the fastest."""
  monkeypatch.setattr(aot_table, "OUT", str(tmp_path))
  cell = ("base", 4096, "v5e-256", True)
  write = lambda name, rep: (tmp_path / f"{name}.json").write_text(json.dumps(rep))
  write(aot_table.old_name(cell, 0, "dots_saveable", 0, False, False), {"failed": "crash"})
  write(aot_table.old_name(cell, 0, "dots_saveable", 0, False, True), report(94))
  write(aot_table.old_name(cell, 1024, "dots_saveable", 0, False, False), report(96))
  zero1 = search_lib.Plan("dots_saveable", "zero1", scan_layers=True)
  write(f"{aot_table.cell_label(cell)}__{zero1.key}", {"failed": "crash"})
  write(f"{aot_table.cell_label(cell)}__{dataclasses.replace(zero1, dropout_rng='rbg').key}",
        report(87))
  today, rep = aot_table.todays_plan(cell)
  assert today == search_lib.Plan("dots_saveable", "data", dropout_rng="rbg") and \
      rep["time"]["step_s"] == 0.094
  asked = []
  s = aot_table.search_cell(cell, lambda plan: asked.append(plan))  # compiles nothing
  result = s.result()
  assert result["best"] == dataclasses.replace(zero1, dropout_rng="rbg").key
  # each crash's first way out (unrolled) is not on disk: the rbg one is; then the speed stage
  assert asked[:2] == [dataclasses.replace(zero1, scan_layers=False),
                       search_lib.Plan("dots_saveable", "data", scan_layers=False)]
  assert asked[2:] == [dataclasses.replace(zero1, scan_layers=False, dropout_rng="rbg"),
                       dataclasses.replace(zero1, sharding="fsdp", dropout_rng="rbg"),
                       *(dataclasses.replace(zero1, dropout_rng="rbg", tensor=t) for t in (2, 4)),
                       dataclasses.replace(zero1, remat="full", dropout_rng="rbg")]
  assert {r["status"] for r in result["plans"]} >= {"fits", "failed: crash",
                                                    "not compiled (budget)"}
  assert aot_table.short(dataclasses.replace(zero1, scan_layers=False, tensor=4)) == \
      "dots / ZeRO-1 / unrolled / tensor 4"


def test_targets_are_read_from_the_rows():
  def cell(config, topo, layout, pairs, ms=10.0, today_ms=10.0, hfu=0.5, plan="dots / data",
           gb=50.0):
    best = dict(pairs_per_s=pairs, step_ms=ms, hfu=hfu, plan=plan, bound="HBM",
                bytes_accessed_gb=gb, chips=int(topo.split("-")[1]))
    return dict(config=config, B=4096, slice=topo, layout=layout, best=best,
                today=dict(step_ms=today_ms),
                tried=[dict(plan=plan, status="fits", gib_per_chip=9.0, step_ms=ms)])
  rows = [cell("base", "v5e-64", "padded", 100, gb=69.2),
          cell("base", "v5e-256", "padded", 310, gb=26.2),
          cell("xlmr", "v5e-64", "padded", 100, plan="full / data"),
          cell("xlmr", "v5e-256", "padded", 250, hfu=0.2, ms=11.0)]
  t = {x["target"]: x for x in aot_table_doc.targets(rows)}
  assert not t["every cell at least as fast as today's plan"]["met"]  # 11 ms against 10
  base = t["base padded B=4096: v5e-256 >= 3x the pairs/s of v5e-64"]
  assert base["ratio"] == 3.1  # 64 and 16 pairs a chip: 69.2 = F + 64 v, 26.2 = F + 16 v
  assert base["detail"].endswith("69.2 -> 26.2 GB = 11.9 GB fixed + 0.90 GB a pair: 3x needs "
                                 "the fixed part <= 7.2 GB")
  assert not t["xlmr padded B=4096: v5e-256 >= 3x the pairs/s of v5e-64"]["met"]
  assert not t["xlmr B=4096 on v5e-64 padded fits without remat=full"]["met"]
  low = t["no cell below 25% HFU without a stated reason"]["below"]
  assert [c["cell"] for c in low] == ["xlmr 4096 v5e-256 padded"]
  assert low[0]["reason"].startswith("HBM-bound: 50 GB accessed per chip per step for 16 pairs")


def test_prior_plan_is_the_best_on_disk_sharded_and_unrolled_and_a_crash_goes_to_rbg(
    tmp_path, monkeypatch):
  """bench/aot_prior.py: for a cell the search has not reached, the best plan on disk with
  ZeRO-1, unrolled layers, threefry (MLM chunks at a 250k vocabulary); after a crash, rbg."""
  import aot_prior
  monkeypatch.setattr(aot_table, "OUT", str(tmp_path))
  monkeypatch.setattr(aot_table, "args_for", lambda cell, plan: [])  # no packing probe
  write = lambda cell, name, rep: (tmp_path / f"{name}.json").write_text(json.dumps(rep))
  base, xlmr = ("base", 4096, "v4-32", True), ("xlmr", 4096, "v5p-128", False)
  write(base, aot_table.old_name(base, 0, "dots_saveable", 0, False, False), {"failed": "crash"})
  write(base, aot_table.old_name(base, 0, "dots_saveable", 0, False, True), report(102))
  write(xlmr, aot_table.old_name(xlmr, 0, "dots_saveable", 0, False, False), report(108))
  P = search_lib.Plan
  want = P("dots_saveable", "zero1", scan_layers=False)
  assert aot_prior.prior_plan(base) == want
  assert aot_prior.prior_plan(xlmr) == dataclasses.replace(want, mlm_vocab_chunk=16384)
  assert aot_prior.prior_plan(("base", 4096, "v5e-64", False)) is None  # nothing on disk
  todo = dict(aot_prior.todo("B4096_(v4-32_packed|v5p-128)$"))
  assert todo == {base: want, xlmr: dataclasses.replace(want, mlm_vocab_chunk=16384)}
  write(base, f"{aot_table.cell_label(base)}__{want.key}", {"failed": "rc -11"})
  rbg = dataclasses.replace(want, dropout_rng="rbg")
  assert dict(aot_prior.todo("B4096_v4-32_packed$")) == {base: rbg}
  write(base, f"{aot_table.cell_label(base)}__{rbg.key}", report(40))
  assert aot_prior.todo("B4096_v4-32_packed$") == []
