"""bepa-compile: the real step compiled by XLA:TPU for a TPU topology on this CPU (libtpu's
compile-only devices), what it reports, and its one-line failures."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from bepa_jax import hlo_stats, tpu_specs
from bepa_jax.aot import batch as aot_batch
from bepa_jax.aot import compile as aot
from bepa_jax.aot import flops
from bepa_jax.aot import libtpu
from bepa_jax.aot import search as search_lib
from bepa_jax.cli import compile as compile_cli
from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import factory
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.errors import ConfigError
from bepa_jax.model import EncoderConfig
from tests.conftest import REPO

needs_libtpu = pytest.mark.skipif(not libtpu.libtpu_available(),
                                  reason="libtpu not installed (pip install -e '.[test]')")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
B, D = 40, 64  # B differs from every other dimension, so a B x B buffer is unambiguous
TINY = [f"--config.train.global_batch={B}", f"--config.model.hidden_size={D}",
        "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.intermediate_size=128", "--config.model.vocab_size=128",
        "--config.data.max_length=16", "--config.model.max_position_embeddings=24",
        "--config.data.max_predictions_per_seq=2", "--config.mesh.data=-1"]


def tiny(*extra):
  from bepa_jax.config import load as config_load
  return config_load.load_config(QUICKSTART, TINY[:] + list(extra))


def run_cli(capsys, *args):
  code = compile_cli.main(["--config", QUICKSTART, *args])
  out, err = capsys.readouterr()
  return code, out, [line for line in err.splitlines() if "error" in line]


# ----------------------------------------------------------------------------- no libtpu needed
def test_topology_names_map_to_libtpu_grids_and_chip_counts():
  v4 = tpu_specs.parse("v4-32")  # v4 names count TensorCores: 16 chips
  assert (v4.chips, v4.topology_name, v4.chip.chip_config) == (16, "v4:2x2x4", "megacore")
  assert tpu_specs.parse("v5e-64").topology_name == "v5e:8x8"
  assert tpu_specs.parse("v5e-256").chips == 256
  assert tpu_specs.parse("v5p-128").topology_name == "v5p:4x4x4"
  assert tpu_specs.parse("v5e-64").accelerator_type == "v5litepod-64"
  for bad in ("v9-8", "v5e-48", "v4-33", "tpu"):
    with pytest.raises(ConfigError, match="--topology"):
      tpu_specs.parse(bad)


def test_hlo_collectives_count_loops_groups_and_async_fusions():
  text = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %ar = f32[8,4]{1,0} all-reduce(%x), replica_groups=[2,4]<=[8], to_apply=%add
  %rs = f32[2,4]{1,0} reduce-scatter(%x), replica_groups={{0,1,2,3}}, dimensions={0}
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  %c = pred[] constant(true)
}

%agf (p0: bf16[2,8]) -> (bf16[2,8], bf16[16,8]) {
  %ag = bf16[16,8]{1,0:T(8,128)} all-gather(%p0), replica_groups=mesh['a'=8,'b'=1] {'a'}, frontend_attributes={chain_id="0"}, metadata={op_name="jit(step)/shard_map/all_gather"}
}

%cont (p0: bf16[2,8]) -> (bf16[2,8], bf16[16,8]) {
  %ag2 = bf16[16,8]{1,0:T(8,128)S(1)} all-gather(%p0), replica_groups=mesh['a'=8,'b'=1] {'a'}, frontend_attributes={chain_id="0"}, metadata={op_name="jit(step)/shard_map/all_gather"}
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %w = (s32[], f32[8,4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %start = (bf16[2,8], bf16[16,8]) fusion(%y), kind=kCustom, calls=%agf
  %f = (f32[4], bf16[16,8]) fusion(%start), kind=kOutput, calls=%cont
}
"""
  colls = hlo_stats.collectives(hlo_stats.Module.parse(text), 8)
  by_kind = {c.kind: c for c in colls}
  assert sorted(by_kind) == ["all-gather", "all-reduce", "reduce-scatter"] and len(colls) == 3
  assert (by_kind["all-reduce"].times, by_kind["all-reduce"].group) == (12, 4)
  assert by_kind["reduce-scatter"].buffer_bytes == 4 * 2 * 4 * 4  # the input: result x group
  ag = by_kind["all-gather"]  # the start and its copy in the overlapped fusion: once
  assert (ag.fused, ag.group, ag.buffer_bytes, ag.times) == (True, 8, 16 * 8 * 2, 1)
  assert ag.wire_bytes == pytest.approx(7 / 8 * 256)


def test_while_trip_count_from_the_loop_condition():
  """XLA:TPU's optimised HLO drops known_trip_count: a scan's `i < N` gives it."""
  text = """HloModule m

%cond (p: (s32[], f32[4])) -> pred[] {
  %constant.7 = s32[]{:T(128)} constant(12)
  %p = (s32[], f32[4]) parameter(0)
  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte, %constant.7), direction=LT
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ar = bf16[4,4]{1,0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body
}
"""
  (c,) = hlo_stats.collectives(hlo_stats.Module.parse(text), 2)
  assert (c.times, c.group, c.buffer_bytes) == (12, 2, 32)


def test_out_of_hbm_compile_errors_are_parsed():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (19.32G) exceeds available HBM (15.75G).")
  assert hlo_stats.oom_bytes(msg) == (pytest.approx(19.32 * 2 ** 30), 15.75 * 2 ** 30)
  assert hlo_stats.oom_bytes("Used 20.5G of 15.75G hbm. Ran out of memory")[1] == 15.75 * 2 ** 30
  assert hlo_stats.oom_bytes("INVALID_ARGUMENT: something else") is None


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  return tokenizer_lib.SentencePieceTokenizer(
      tokenizer_lib.train_sentencepiece(corpus_lib.load_embedded().texts(), out, 400))


@pytest.mark.parametrize("cls_input,mlm_input", [("masked", "sentence"), ("clean", "sentence"),
                                                 ("clean", "pair")])
def test_abstract_batch_is_what_the_pipeline_yields(tok, cls_input, mlm_input):
  config = tiny(f"--config.loss.cls_input={cls_input}", f"--config.loss.mlm_input={mlm_input}",
                "--config.train.global_batch=8", "--config.data.packing=False")
  real = factory.build_pipeline(config, tok).batch(0)
  spec = aot_batch.batch_shapes(config)
  assert sorted(spec) == sorted(real)
  for k, v in real.items():
    assert (spec[k][0], spec[k][1]) == (v.shape, np.asarray(v).dtype), k


@pytest.mark.parametrize("cls_input,mlm_input", [("masked", "sentence"), ("clean", "sentence"),
                                                 ("clean", "pair")])
def test_abstract_packed_batch_is_what_the_pipeline_yields(tok, cls_input, mlm_input):
  """With the rows given, the packed [G, R, L] layout: G = batch shards x micro-batches."""
  shards = 2
  args = [f"--config.loss.cls_input={cls_input}", f"--config.loss.mlm_input={mlm_input}",
          "--config.train.global_batch=16", "--config.data.packing=True",
          "--config.train.grad_accum_steps=2", "--config.data.max_length=128",
          "--config.model.max_position_embeddings=128"]
  auto = factory.build_pipeline(tiny(*args), tok, batch_shards=shards)  # rows from the data
  R, R2 = auto.rows
  assert 0 < R < 2 * 16 // (shards * 2)  # packed: fewer rows than sentences per group
  config = tiny(*args, f"--config.data.packed_rows={R}", f"--config.data.packed_pair_rows={R2}")
  assert aot_batch.packed_rows(config) == (R, R2 if mlm_input == "pair" else 0)
  real = factory.build_pipeline(config, tok, batch_shards=shards).batch(0)
  spec = aot_batch.batch_shapes(config, batch_shards=shards)
  assert sorted(spec) == sorted(real)
  for k, v in real.items():
    assert (spec[k][0], spec[k][1]) == (v.shape, np.asarray(v).dtype), k
  assert spec["input_ids"][0] == (shards * 2, R, 128)
  assert aot_batch.token_slots(config, shards) == shards * 2 * R * 128
  # rows chosen from the data (0): no packed shape without data
  assert aot_batch.packed_rows(tiny(*args)) is None


def test_without_libtpu_one_line_says_how_to_install(capsys, monkeypatch):
  monkeypatch.setattr(libtpu, "libtpu_available", lambda: False)
  code, out, err = run_cli(capsys, "--topology", "v5e-8", *TINY)
  assert code == 2 and len(err) == 1
  assert "libtpu is not installed" in err[0] and "pip install 'libtpu==" in err[0]


def test_vocab_size_from_a_tokenizer_file_must_be_given():
  config = tiny("--config.model.vocab_size=0", "--config.tokenizer.path=/some/spm.model")
  with pytest.raises(ConfigError, match="--config.model.vocab_size"):
    aot_batch.vocab_size(config)
  # tokenizer.vocab_size
  assert aot_batch.vocab_size(tiny("--config.model.vocab_size=0"))[0] == 1000


CRASH = """import os, signal, sys
print("compiling ...", file=sys.stderr, flush=True)
print("*** SIGSEGV STACK OVERFLOW (see go/cppstackoverflow) received by PID 1 ***", file=sys.stderr)
print("PC: @     0x7f6c7d19d736  (unknown)  xla::Emitter::Recurse()", file=sys.stderr)
print("    @     0x7f6c8a40cfd3       1888  FailureSignalHandler()", file=sys.stderr, flush=True)
os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_a_compiler_crash_is_one_line_and_a_json(capfd, tmp_path):
  """XLA:TPU can die of a signal (no Python exception): the child's crash dump becomes one
  line naming where, exit 1, and {"failed": "crash"} where the report would have been."""
  out = tmp_path / "r.json"
  code = compile_cli.run_isolated([sys.executable, "-c", CRASH], str(out))
  err = capfd.readouterr().err.splitlines()
  assert code == 1 and err[0] == "compiling ..." and len(err) == 2, err
  assert err[1].startswith("bepa-compile: error: XLA:TPU crashed compiling the step (SIGSEGV "
                           "stack overflow in xla::Emitter::Recurse()")
  assert "--config.train.dropout_rng=rbg" in err[1]
  assert json.loads(out.read_text())["failed"] == "crash"
  # a child that exits normally: its code and its output, untouched
  assert compile_cli.run_isolated([sys.executable, "-c", "import sys; print('PC: @ x', "
                                   "file=sys.stderr); sys.exit(3)"]) == 3
  assert capfd.readouterr().err == "PC: @ x\n"
  # the library's side: the crash is an error (the command turns it into exit 1)
  with pytest.raises(libtpu.CompilerCrashed, match="stack overflow"):
    libtpu.run_isolated([sys.executable, "-c", CRASH])


# ----------------------------------------------------------------------------- with libtpu
@needs_libtpu
def test_v4_topologies_have_one_device_per_chip():
  devices = libtpu.topology_devices(tpu_specs.parse("v4-32"), 1)
  assert len(devices) == 16 and devices[0].device_kind == "TPU v4"


@needs_libtpu
@pytest.mark.parametrize("args,message", [
    (["--topology", "v5e-48"], "known sizes"),
    (["--topology", "v5e-8", "--config.mesh.data=3"], "does not match the 8 devices"),
    (["--topology", "v5e-8", "--slices", "2"], "--config.mesh.dcn_data=2"),
    (["--topology", "v5e-8", "--config.train.global_batch=44"], "not divisible"),
    (["--topology", "v5e-8", "stray"], "unexpected argument"),
])
def test_bad_input_is_one_line(capsys, args, message):
  code, out, err = run_cli(capsys, *TINY, *args)
  assert code == 2 and len(err) == 1 and message in err[0], err
  assert "Traceback" not in out


@needs_libtpu
def test_tiny_model_on_v5e_8_compiles_and_reports(capsys, tmp_path):
  out_json = tmp_path / "report.json"
  code, out, err = run_cli(capsys, "--topology", "v5e-8", *TINY, "--out", str(out_json))
  assert code == 0 and not err, err
  rep = json.loads(out_json.read_text())
  assert rep["chips"] == 8 and rep["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  m = rep["memory"]
  assert m["fits"] and 0 < m["total"] < m["hbm"] == 16 * 2 ** 30
  # params + Adam's m and v, replicated: 3 x 4 bytes x params on every chip
  assert m["params_and_optimizer"] == pytest.approx(12 * rep["params"], rel=0.01)
  assert m["arguments"] >= m["params_and_optimizer"] + m["batch"]
  assert rep["cost"]["flops_per_chip"] > 0 and rep["time"]["step_s"] > 0
  assert 0 < rep["mfu"] <= 1.0
  # the b x B claim on XLA:TPU: no B x B buffer anywhere in the compiled step
  assert rep["b_by_B_buffers"] == []
  # the [CLS] gather of each side: B x D, gathered in bf16 (XLA:TPU feeds the similarity
  # matmul bf16 operands at default precision and moves the cast before the gather)
  gathers = [c for c in rep["collectives"] if c["role"] == "[CLS] all-gather (fwd)"]
  assert len(gathers) == 2 and all(c["buffer_bytes"] == B * D * 2 for c in gathers), gathers
  assert any(c["role"].startswith("gradient all-reduce") for c in rep["collectives"])
  assert "[CLS] all-gather" in out and "fits" in out


@needs_libtpu
def test_multislice_spans_data_over_slices(capsys, tmp_path):
  code, out, err = run_cli(capsys, "--topology", "v5e-8", "--slices", "2", *TINY,
                           "--config.train.global_batch=64", "--config.mesh.dcn_data=2",
                           "--out", str(tmp_path / "r.json"))
  assert code == 0, err
  rep = json.loads((tmp_path / "r.json").read_text())
  assert rep["chips"] == 16 and rep["mesh"]["data"] == 16 and rep["slices"] == 2


@needs_libtpu
def test_oversized_config_is_one_line_does_not_fit(capsys, tmp_path):
  # a 16M-piece vocabulary: 1.0B parameters, params + Adam state 11.6 GiB on every chip
  code, out, err = run_cli(capsys, "--topology", "v5e-8", *TINY,
                           "--config.model.vocab_size=16000000", "--out", str(tmp_path / "r.json"))
  assert code == 1 and len(err) == 1, err
  assert "does not fit" in err[0] and "--config.mesh.fsdp" in err[0]
  assert json.loads((tmp_path / "r.json").read_text())["memory"]["fits"] is False


@needs_libtpu
def test_packed_layout_compiles_with_fewer_positions():
  """data.packed_rows=R compiles the packed step: R rows per group, not one per sentence, and
  the same B x D [CLS] gather (the contrastive loss sees every pair either way)."""
  topo = tpu_specs.parse("v5e-8")
  padded = aot.compile_step(tiny("--config.data.packing=False"), topo, tokens_per_sentence=6)
  packed = aot.compile_step(tiny("--config.data.packing=True", "--config.data.packed_rows=4"),
                            topo, tokens_per_sentence=6)
  assert padded["layout"] == "padded" and packed["layout"].startswith("packed (4 rows")
  assert padded["token_slots_per_step"] == 2 * B * 16
  assert packed["token_slots_per_step"] == 8 * 4 * 16  # 8 groups (one per chip) x 4 rows
  assert packed["cost"]["flops_per_chip"] < 0.7 * padded["cost"]["flops_per_chip"]
  # the same pairs: the same pairs/s-to-real-tokens/s relation, from the given mean length
  for rep in (padded, packed):
    assert rep["real_tokens_per_s"] == pytest.approx(rep["pairs_per_s"] * 2 * 6)
    assert rep["b_by_B_buffers"] == []
    gathers = [c for c in rep["collectives"] if c["role"] == "[CLS] all-gather (fwd)"]
    assert sum(c["buffer_bytes"] for c in gathers) == 2 * B * D * 2, gathers
  # rows chosen from the data: compiled padded, and said so
  auto = aot.compile_step(tiny("--config.data.packing=True"), topo)
  assert auto["layout"].startswith("padded: the upper bound of data.packing")
  assert auto["token_slots_per_step"] == 2 * B * 16 and auto["real_tokens_per_s"] is None


@needs_libtpu
def test_more_real_tokens_than_packed_positions_is_one_line(capsys):
  code, out, err = run_cli(capsys, "--topology", "v5e-8", *TINY, "--config.data.packing=True",
                           "--config.data.packed_rows=2", "--tokens_per_sentence", "7")
  assert code == 2 and len(err) == 1 and "more than the 256 positions" in err[0], err


@needs_libtpu
def test_flops_count_every_scanned_layer():
  """cost_analysis() counts a while body once; the report's flops count all 3 layers."""
  topo = tpu_specs.parse("v5e-8")
  flops = {}
  for scan in (True, False):
    config = tiny("--config.model.num_layers=3", f"--config.model.scan_layers={scan}")
    flops[scan] = aot.compile_step(config, topo)["cost"]
  assert flops[False]["loop_scale_flops"] == pytest.approx(1.0)
  assert flops[True]["xla_flops_per_chip"] < 0.7 * flops[False]["flops_per_chip"]
  assert flops[True]["flops_per_chip"] == pytest.approx(flops[False]["flops_per_chip"], rel=0.05)


# ----------------------------------------------------------------------------- model FLOPs
def test_model_flops_are_a_hand_count_of_the_useful_work():
  """MFU's numerator on the tiny config (h 64, 1 layer, I 128, V 128, B 40 pairs, P 2), counted
  by hand: the real tokens only, no padding, no remat recompute."""
  config = tiny()
  model_cfg = EncoderConfig.from_config(config.model)
  fl = flops.step_model_flops(config, model_cfg, tokens_per_sentence=10)
  # 80 sentences x 10 real tokens; per token 3 x 2 x (4 x 64^2 + 2 x 64 x 128) = 196,608
  assert fl["dense"] == 800 * 196_608
  assert fl["attention"] == 80 * 3 * 4 * 64 * 10 ** 2  # QK^T and PV over each sentence
  # 0.15 x 8 content tokens = 1.2 masked per sentence, 6 x (64^2 + 64 x 128) flops each
  assert fl["mlm_head"] == pytest.approx(80 * 1.2 * 6 * 12_288)
  assert fl["contrastive"] == 3 * 2 * (2 * 40 * 40 * 64)  # each direction's B x B logits
  assert fl["total"] == pytest.approx(171_737_088)
  # remat and the padded length are not useful work
  other = tiny("--config.model.remat=full", "--config.data.max_length=24")
  assert flops.step_model_flops(other, model_cfg, 10)["total"] == fl["total"]
  # the authors' clean [CLS]: a second trained pass over the sentences, the same MLM head
  clean = flops.step_model_flops(tiny("--config.loss.cls_input=clean"), model_cfg, 10)
  assert clean["dense"] == 2 * fl["dense"] and clean["mlm_head"] == fl["mlm_head"]
  # without the data's mean length every sentence counts as max_length (16) long
  assert flops.step_model_flops(config, model_cfg)["real_tokens"] == 80 * 16


# ----------------------------------------------------------------------------- the plan search
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
  fastest then unrolled, with fsdp, with remat=full and with rbg dropout."""
  P = search_lib.Plan
  size = lambda p: (20 - 2 * (p.sharding == "zero1") - 5 * bool(p.mlm_vocab_chunk)
                    - 6 * (p.sharding == "fsdp") - 8 * (p.remat == "full"))
  time_ms = lambda p: (100 - 5 * (p.sharding == "zero1") - 3 * bool(p.mlm_vocab_chunk)
                       + 10 * (p.remat == "full") - 4 * (not p.scan_layers)
                       + 8 * (p.dropout_rng == "rbg"))
  s, asked = fake_search(size, time_ms, vocab=250_002, extra=(
      "--config.model.hidden_dropout=0.1", "--config.model.scan_layers=True",
      "--config.model.remat=dots_saveable"))
  result = s.run()
  best = P("dots_saveable", "zero1", 16384)
  assert asked == [best, P("dots_saveable", "zero1"), P("dots_saveable", "data", 16384),
                   dataclasses.replace(best, scan_layers=False),
                   dataclasses.replace(best, sharding="fsdp"),
                   dataclasses.replace(best, remat="full"),
                   dataclasses.replace(best, dropout_rng="rbg")]
  rows = {r["key"]: r for r in result["plans"]}
  skipped = rows[P("dots_saveable", "data").key]
  assert skipped["status"].startswith("skipped: needs at least the memory of remat="
                                      "dots_saveable, ZeRO-1, scanned")
  assert result["compiles"] == 7 and result["best"] == dataclasses.replace(
      best, scan_layers=False).key
  assert [rows[k]["step_ms"] for k in result["ranked"]] == [88, 92, 97, 97, 100, 102]
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
  scanned; with fsdp and dots_saveable too, but --max_compiles stops it: 3 compiles, each in
  its own process."""
  out = tmp_path / "s.json"
  code, stdout, err = run_cli(capsys, "--search", "--topology", "v5e-8", *TINY, "--out", str(out),
                              "--max_compiles", "3")
  assert code == 0 and not err, err
  result = json.loads(out.read_text())
  rows = {r["key"]: r for r in result["plans"]}
  assert result["compiles"] == 3 and len(result["ranked"]) == 3
  assert [r["status"] for r in result["plans"]][3:] == ["not compiled (budget)"] * 2
  assert [r["plan"]["sharding"] for r in result["plans"]][3] == "fsdp"
  assert rows[result["plans"][4]["key"]]["plan"]["remat"] == "dots_saveable"
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
