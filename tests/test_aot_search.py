"""bepa-compile --search (bepa_jax/aot/search.py): the pruned grid on fake compiles, then a real
one over tiny v5e-8 compiles, and its one-line failures."""
import dataclasses
import json

import pytest

from bepa_jax.aot import search as search_lib
from bepa_jax.cli import compile as compile_cli
from tests.aot_common import TINY, needs_libtpu, run_cli, tiny

GIB = 2 ** 30


def fake_search(size, time_ms, crash=(), vocab=128, extra=()):
  """A Search over 64 chips of 16 GiB whose compiles are `size(plan)` GiB and `time_ms(plan)`
  ms (`crash`: plans that crash XLA:TPU); returns (search, the plans compiled in order)."""
  config = tiny("--config.train.global_batch=1024", *extra)
  shape = search_lib.Shape.of(config, 64, 16 * GIB, vocab)
  asked = []

  def compile_fn(plan):
    asked.append(plan)
    if plan in crash:
      return {"failed": "crash"}
    total = size(plan) * GIB
    return {"memory": {"fits": total <= 16 * GIB, "total": total, "hbm": 16 * GIB},
            "time": {"step_s": time_ms(plan) / 1e3, "bound": "HBM"}, "pairs_per_s": 1.0,
            "mfu": 0.1, "hfu": 0.2}
  return search_lib.Search(config, shape, compile_fn, log=lambda m: None), asked


def test_search_prunes_by_memory_then_tries_the_fastest_plans_variants():
  """XLM-R's vocabulary: chunked and dense MLM; a plan that needs no less memory than one that
  did not fit is skipped, fsdp and remat=full are not tried once a lighter plan fits; the
  fastest then unrolled, with fsdp, split over a tensor axis (16 pairs per chip: a small
  share), with remat=full and with rbg dropout."""
  P = search_lib.Plan
  size = lambda p: (20 - 2 * (p.sharding == "zero1") - 5 * bool(p.mlm_vocab_chunk)
                    - 6 * (p.sharding == "fsdp") - 8 * (p.remat == "full"))
  time_ms = lambda p: (100 - 5 * (p.sharding == "zero1") - 3 * bool(p.mlm_vocab_chunk)
                       + 10 * (p.remat == "full") - 4 * (not p.scan_layers)
                       + 8 * (p.dropout_rng == "rbg") - 2 * (p.tensor > 1))
  s, asked = fake_search(size, time_ms, vocab=250_002, extra=(
      "--config.model.hidden_dropout=0.1", "--config.model.scan_layers=True",
      "--config.model.remat=dots_saveable"))
  result = s.run()
  best = P("dots_saveable", "zero1", 16384)
  assert asked == [best, P("dots_saveable", "zero1"), P("dots_saveable", "data", 16384),
                   dataclasses.replace(best, scan_layers=False),
                   dataclasses.replace(best, sharding="fsdp"),
                   dataclasses.replace(best, tensor=2),
                   dataclasses.replace(best, remat="full"),
                   dataclasses.replace(best, dropout_rng="rbg")]
  rows = {r["key"]: r for r in result["plans"]}
  tp4 = rows[dataclasses.replace(best, tensor=4).key]  # 2 heads: not compiled, and why
  assert tp4["status"] == ("invalid: model.num_heads=2 is not divisible by mesh.tensor=4 "
                           "(mesh.rules splits 'heads' over tensor)")
  skipped = rows[P("dots_saveable", "data").key]
  assert skipped["status"].startswith("skipped: needs at least the memory of remat="
                                      "dots_saveable, ZeRO-1, scanned")
  assert result["compiles"] == 8 and result["best"] == dataclasses.replace(
      best, scan_layers=False).key
  assert [rows[k]["step_ms"] for k in result["ranked"]] == [88, 90, 92, 97, 97, 100, 102]
  # to paste: only what differs from the config
  assert result["best_overrides"] == ["--config.mesh.shard_optimizer=True",
                                      "--config.loss.mlm_vocab_chunk=16384",
                                      "--config.model.scan_layers=False"]
  text = search_lib.format_result(result, "v5e-64")
  assert "bepa-train overrides: --config.mesh.shard_optimizer=True" in text


def test_search_goes_to_fsdp_remat_full_then_gradcache_and_says_when_nothing_fits():
  P = search_lib.Plan
  size = lambda p: ({"data": 30, "zero1": 25, "fsdp": 24}[p.sharding] - 6 * (p.remat == "full")
                    - {0: 0, 4: 3, 16: 8}[p.gradcache_chunks])
  s, asked = fake_search(size, lambda p: 100)
  result = s.run()
  gc4 = P("full", "fsdp", scan_layers=False, gradcache_chunks=4)
  assert asked == [P("none", "zero1", scan_layers=False), P("none", "fsdp", scan_layers=False),
                   P("dots_saveable", "zero1", scan_layers=False),
                   P("dots_saveable", "fsdp", scan_layers=False),
                   P("full", "zero1", scan_layers=False), P("full", "fsdp", scan_layers=False),
                   gc4, dataclasses.replace(gc4, scan_layers=True)]
  assert result["best"] == gc4.key and "--config.train.gradcache_chunks=4" in \
      result["best_overrides"]
  # nothing fits anywhere: no ranking, one line naming the smallest
  s, _ = fake_search(lambda p: 40 - p.gradcache_chunks, lambda p: 100)
  result = s.run()
  assert result["ranked"] == [] and result["best"] is None
  line = search_lib.nothing_fits(result, "v5e-64")
  assert line.startswith("no plan fits on v5e-64 (") and "GradCache 16, needs 24.00 of 16 " \
      "GiB" in line and "\n" not in line


def test_search_gets_around_a_compiler_crash_and_skips_needless_chunks():
  """A crash (threefry dropout in scanned layers) is retried unrolled, then with rbg; once
  seen, other scanned threefry plans are not compiled but replaced by their way out."""
  P = search_lib.Plan
  crashed = P("none", "zero1")
  s, asked = fake_search(lambda p: 1, lambda p: 50 if p.dropout_rng == "rbg" else 60,
                         crash=(crashed,), extra=("--config.model.attention_dropout=0.1",
                                                  "--config.model.scan_layers=True"))
  result = s.run()
  unrolled = dataclasses.replace(crashed, scan_layers=False)
  assert asked[:3] == [crashed, unrolled, P("none", "data", scan_layers=False)]
  rows = {r["key"]: r for r in result["plans"]}
  assert rows[crashed.key]["status"] == "failed: crash"
  assert rows[P("none", "data").key]["status"] == ("skipped: scanned layers with threefry "
                                                   "dropout crashed XLA:TPU here")
  # the speed stage: unrolled rbg is the fastest here (50 ms against 60)
  assert result["best"] == dataclasses.replace(unrolled, dropout_rng="rbg").key
  assert all(p.scan_layers is False or p == crashed for p in asked)
  # chunking where the dense buffers are large only
  shape = lambda B, V, chips: search_lib.Shape.of(
      tiny(f"--config.train.global_batch={B}"), chips, 16 * GIB, V)
  assert shape(4096, 32000, 64).vocab_chunks() == (0,)
  assert shape(4096, 250_002, 64).vocab_chunks() == (16384, 0)
  assert shape(4096, 250_002, 64).contrastive_chunks() == (0,)
  assert shape(65536, 32000, 64).contrastive_chunks() == (1024, 0)
  assert shape(40, 128, 8).combos(fsdp=False) == [P("dots_saveable", "zero1", scan_layers=False),
                                                  P("dots_saveable", "data", scan_layers=False)]


@needs_libtpu
def test_search_compiles_a_grid_and_ranks_the_plans_that_fit(capsys, tmp_path):
  """bepa-compile --search on v5e-8: ZeRO-1 and data parallel at remat=none, then the fastest
  scanned; with fsdp, tensor 2 (5 pairs a chip; tensor 4 does not divide the 2 heads) and
  dots_saveable too, but --max_compiles stops it: 3 compiles, each in its own process."""
  out = tmp_path / "s.json"
  code, stdout, err = run_cli(capsys, "--search", "--topology", "v5e-8", *TINY, "--out", str(out),
                              "--max_compiles", "3")
  assert code == 0 and not err, err
  result = json.loads(out.read_text())
  rows = {r["key"]: r for r in result["plans"]}
  assert result["compiles"] == 3 and len(result["ranked"]) == 3
  statuses = [r["status"] for r in result["plans"]][3:]
  assert statuses[:2] + statuses[3:] == ["not compiled (budget)"] * 3
  assert statuses[2].startswith("invalid: model.num_heads=2 is not divisible by mesh.tensor=4")
  assert [r["plan"]["sharding"] for r in result["plans"]][3] == "fsdp"
  assert [r["plan"]["tensor"] for r in result["plans"]][4:6] == [2, 4]
  assert rows[result["plans"][6]["key"]]["plan"]["remat"] == "dots_saveable"
  times = [rows[k]["step_ms"] for k in result["ranked"]]
  assert times == sorted(times)
  for key in result["ranked"]:  # each plan's own report, from its own child
    rep = json.loads((tmp_path / "s.plans" / f"{key}.json").read_text())
    assert rep["time"]["step_s"] * 1e3 == pytest.approx(rows[key]["step_ms"])
    assert rep["memory"]["fits"] and 0 < rep["mfu"] <= rep["hfu"]
    zero1 = rows[key]["plan"]["sharding"] == "zero1"
    # ZeRO-1: Adam's moments split over the 8 chips
    state = rep["memory"]["opt_state"] / rep["memory"]["params"]
    assert state == pytest.approx(2 / 8 if zero1 else 2, rel=0.05), key
  # the best plan's overrides reproduce it
  best = search_lib.Plan(**rows[result["best"]]["plan"])
  config = tiny(*result["best_overrides"])
  assert search_lib.plan_config(config, best).to_dict() == config.to_dict()
  assert "bepa-train overrides:" in stdout and stdout.index("plans for v5e-8") == 0


@needs_libtpu
@pytest.mark.parametrize("args,code,message", [
    (["--topology", "v5e-48"], 2, "known sizes"),
    (["--topology", "v5e-8", "--hlo", "x.hlo"], 2, "--hlo writes one compiled plan"),
    (["--topology", "v5e-8", "--config.train.global_batch=44"], 2, "not divisible"),
    (["--topology", "v5e-8"], 1, "no plan fits on v5e-8 (6 compiled; the smallest"),
])
def test_search_bad_input_and_nothing_fits_are_one_line(capsys, monkeypatch, args, code,
                                                        message):
  too_big = {"memory": {"fits": False, "total": 17 * GIB, "hbm": 16 * GIB}}
  monkeypatch.setattr(compile_cli, "plan_compiler", lambda *a: lambda plan: too_big)
  got, out, err = run_cli(capsys, "--search", *TINY, *args)
  assert got == code and len(err) == 1 and message in err[0], err


def test_plan_keys_round_trip_and_keep_the_names_on_disk():
  P = search_lib.Plan
  for plan in (P("full", "zero1", 16384, 1024, False, "rbg", 4, 4), P("none"),
               P("dots_saveable", tensor=2)):
    assert P.from_key(plan.key) == plan
  assert P("none").key == "none.data.mc0.cc0.scan.threefry2x32"  # as the reports were named
  tp4 = P("none", "fsdp", tensor=4)
  assert tp4.key.endswith(".tp4") and "tensor 4" in tp4.describe()
  assert {k: v for k, v in tp4.settings().items() if k.startswith("mesh.")} == {
      "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 4, "mesh.shard_optimizer": False}
