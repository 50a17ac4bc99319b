"""The batch spec (bepa_jax/data/batch_spec.py) is what the pipeline yields, in every layout
(padded, packed, TLM; per process; packed fallback), what bepa-compile's abstract batch holds,
what the model is initialised from and which encoder passes the throughput counters count."""
import numpy as np
import pytest

from bepa_jax.aot import batch as aot
from bepa_jax.data import batch_spec, pair_pipeline, sources
from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.training import state as train_state
from tests.helpers import tiny_config

MODES = {"masked": ("masked", "sentence"), "clean": ("clean", "sentence"),
         "pair": ("clean", "pair")}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok"))
  return tokenizer_lib.SentencePieceTokenizer(
      tokenizer_lib.train_sentencepiece(corpus_lib.load_embedded().texts(), out, 400))


def _pipe(tok, mode, packing=False, rows=(0, 0)):
  cls_input, mlm_input = MODES[mode]
  comps, weights, stats = sources.open_sources("embedded:en,de,fr,ru")
  return pair_pipeline.PairPipeline(
      comps, weights, tok, global_batch=16, max_length=64 if packing else 24, mask_prob=0.15,
      max_predictions=4, seed=1, load_stats=stats, cls_input=cls_input, mlm_input=mlm_input,
      packing=packing, packed_rows=rows[0], packed_pair_rows=rows[1], batch_shards=4,
      micro_batches=2)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["padded", "packed_auto", "packed_fallback"])
def test_every_pipeline_batch_matches_its_spec(tok, mode, layout):
  pipe = _pipe(tok, mode, packing=layout != "padded",
               rows=(1, 1) if layout == "packed_fallback" else (0, 0))
  for step in (0, 3, 11):
    for pcount in (1, 2, 4):
      for pid in range(pcount):
        before = pipe.counters["packing_fallback_steps"]
        b = pipe.batch(step, pid, pcount)
        fell = pipe.counters["packing_fallback_steps"] > before
        spec = pipe.spec(pcount, pipe.fallback_rows if fell else None)
        assert spec.mismatches(b) == [], (step, pcount, pid)
        assert spec.packed == pipe.packing and spec.pairs == 16 // pcount
        if pipe.packing:
          assert batch_spec.packed_rows_of(b) == spec.rows
        if layout == "packed_fallback":
          assert fell  # rows of 1 never hold a group's sentences
  if layout != "padded":  # the rows asked for, as the train loop asks on several processes
    b = pipe.batch(5, 1, 2, rows=pipe.fallback_rows)
    assert pipe.spec(2, pipe.fallback_rows).mismatches(b) == []


def test_mismatches_name_the_key():
  spec = batch_spec.BatchSpec(2, 8, 3)
  batch = {k: np.zeros(s, d) for k, (s, d) in spec.shapes().items()}
  assert spec.mismatches(batch) == []
  batch["mlm_weights"] = batch["mlm_weights"].astype(np.int32)
  batch["extra"] = np.zeros(1)
  del batch["text_hash"]
  assert spec.mismatches(batch) == ["text_hash: missing", "extra: not in the spec",
                                    "mlm_weights: int32[2, 2, 3], spec float32[2, 2, 3]"]


def _config(mode, **over):
  cls_input, mlm_input = MODES[mode]
  return tiny_config(**{"loss.cls_input": cls_input, "loss.mlm_input": mlm_input,
                        "train.global_batch": 16, **over})


CONFIGS = {
    "padded": {},
    "packed_rows": {"data.packing": True, "data.max_length": 128, "data.packed_rows": 3,
                    "data.packed_pair_rows": 2},
    "packed_accum": {"data.packing": True, "data.max_length": 128, "data.packed_rows": 2,
                     "data.packed_pair_rows": 1, "train.grad_accum_steps": 2},
    "packed_auto": {"data.packing": True, "data.max_length": 128},  # rows from the data: padded
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shards", [1, 4])
def test_spec_is_bepa_compiles_abstract_batch(mode, name, shards):
  config = _config(mode, **CONFIGS[name])
  assert batch_spec.shapes(config, shards) == aot.batch_shapes(config, shards)
  assert batch_spec.configured_rows(config) == aot.packed_rows(config)
  spec = batch_spec.from_config(config, shards)
  assert spec.packed == (name in ("packed_rows", "packed_accum"))
  if spec.packed:
    assert spec.groups == shards * (2 if name == "packed_accum" else 1)


def test_spec_of_config_is_the_built_pipelines(tok, tmp_path):
  from bepa_jax.data import factory
  for mode in MODES:
    config = _config(mode, **CONFIGS["packed_rows"])
    pipe = factory.build_pipeline(config, tok, batch_shards=4)
    assert pipe.spec() == batch_spec.from_config(config, 4)
    b = pipe.batch(0)
    fell = pipe.counters["packing_fallback_steps"] > 0  # 3 rows may not hold a group
    assert pipe.spec(rows=pipe.fallback_rows if fell else None).mismatches(b) == []


def test_example_inputs_come_from_the_spec():
  config = tiny_config(**{"data.max_length": 12, "data.max_predictions_per_seq": 5})
  got = train_state.example_inputs(config)
  want = dict(input_ids=np.zeros((2, 12), np.int32), token_type_ids=np.zeros((2, 12), np.int32),
              attention_mask=np.ones((2, 12), np.int32), mlm_positions=np.zeros((2, 5), np.int32))
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("cls_input,mlm_input,ema,want", [
    ("masked", "sentence", False, ("attention_mask",)),
    ("clean", "sentence", False, ("attention_mask", "attention_mask")),
    ("clean", "pair", False, ("attention_mask", "mlm_attention_mask")),
    ("masked", "sentence", True, ("attention_mask", "attention_mask")),
    ("clean", "pair", True, ("attention_mask", "mlm_attention_mask", "attention_mask")),
])
def test_encoder_passes(cls_input, mlm_input, ema, want):
  assert batch_spec.encoder_mask_keys(cls_input, mlm_input, ema) == want
  spec = batch_spec.BatchSpec(2, 8, 3, cls_input, mlm_input).shapes()
  assert all(k in spec for k in want)  # every pass's mask is in the batch
