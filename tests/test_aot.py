"""bepa-compile: the real step compiled by XLA:TPU for a TPU topology on this CPU (libtpu's
compile-only devices), what it reports, and its one-line failures."""
import json
import sys

import numpy as np
import pytest

from bepa_jax import hlo_stats, tpu_specs
from bepa_jax.aot import batch as aot_batch
from bepa_jax.aot import compile as aot
from bepa_jax.aot import flops
from bepa_jax.aot import libtpu
from bepa_jax.cli import compile as compile_cli
from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import factory
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.errors import ConfigError
from bepa_jax.model import EncoderConfig
from tests.aot_common import B, D, TINY, needs_libtpu, run_cli, tiny


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
def test_a_tensor_axis_the_torus_cannot_hold_whole_splits_a_physical_axis():
  """v5e-256 is a 16x16 torus: tensor=4 fits no physical axis whole, so one is split (as
  MaxText's allow_split_physical_axes); each tensor group is still 4 neighbouring chips."""
  from jax.experimental import mesh_utils

  from bepa_jax import mesh as mesh_lib
  devices = libtpu.topology_devices(tpu_specs.parse("v5e-256"), 1)
  with pytest.raises(NotImplementedError):
    mesh_utils.create_device_mesh((64, 1, 4), devices)
  mesh = mesh_lib.create_mesh(tiny("--config.mesh.tensor=4").mesh, devices)
  assert dict(mesh.shape) == {"data": 64, "fsdp": 1, "tensor": 4}
  assert len({d.id for d in mesh.devices.flat}) == 256
  for group in mesh.devices.reshape(64, 4):
    coords = np.array([d.coords[:2] for d in group])
    assert (coords.max(0) - coords.min(0)).tolist() in ([3, 0], [0, 3], [1, 1]), coords


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
