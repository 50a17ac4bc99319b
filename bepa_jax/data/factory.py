"""Config -> the run's tokenizer and its input pipeline (every source kind, `embedded` too)."""
from __future__ import annotations

import logging
import os

from bepa_jax import mesh as mesh_lib
from bepa_jax.config import validate as config_lib
from bepa_jax.data import pair_pipeline, sources, store
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.data import tokenizers as tokenizers_lib
from bepa_jax.errors import InputError

log = logging.getLogger("bepa")


def open_configured_sources(data_cfg):
  """(components, weights, load stats) of `data.source` under the config's text policy; with
  data.cache_dir, from the record store (data/store.py), written first when missing."""
  args = (str(data_cfg.source), sources.TextPolicy.from_config(data_cfg),
          sources.parse_pairs(str(data_cfg.pairs)), str(data_cfg.tfds_data_dir) or None,
          config_lib.split_list(data_cfg.languages))
  if not data_cfg.cache_dir:
    return sources.open_sources(*args)
  material = store.material(*args)
  corpus = _by_process_0(lambda build: store.open_corpus(
      str(data_cfg.cache_dir), material, lambda: sources.open_sources(*args), build))
  return corpus.components, corpus.weights, corpus.stats


def _by_process_0(open_store):
  """`open_store(build)`: process 0 builds a missing store while the others wait, then they
  open it (on storage every host sees) or build their own (on a host's local disk)."""
  import jax
  if jax.process_count() == 1:
    return open_store(True)
  from jax.experimental import multihost_utils
  if jax.process_index() == 0:
    got = open_store(True)
    multihost_utils.sync_global_devices("bepa record store")
    return got
  multihost_utils.sync_global_devices("bepa record store")
  return open_store(True)


def training_texts(data_cfg, limit: int = 2_000_000, opened=None):
  """Distinct sentences of the configured sources (to train a tokenizer on first use);
  `opened`: open_configured_sources' result, when the caller has it."""
  comps, _, _ = opened or open_configured_sources(data_cfg)
  return sources.iter_texts(comps, limit)


def load_tokenizer(config, workdir: str, train_if_missing: bool = True,
                   hf_dir: str | None = None, opened=None) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer: tokenizer.path (of tokenizer.kind), else `hf_dir`'s, else the
  sentencepiece model cached in the workdir, trained on the corpus on first use.

  `hf_dir` is where init.hf_dir keeps its tokenizer (for a sentence-transformers model, its
  encoder's folder): the caller resolves it (bepa_jax.hf.init.tokenizer_dir), as data/ does
  not read HF directories."""
  import jax
  if config.tokenizer.path:
    return tokenizers_lib.load(str(config.tokenizer.path), str(config.tokenizer.kind))
  if config.init.hf_dir and not hf_dir:  # a caller's bug: never train a tokenizer instead
    raise TypeError("load_tokenizer: init.hf_dir is set but hf_dir was not passed")
  if hf_dir:
    if tokenizers_lib.find(hf_dir) is None:
      raise InputError(f"init.hf_dir: {hf_dir} has no tokenizer (tokenizer.json, "
                       f"sentencepiece.bpe.model or spm.model); set tokenizer.path")
    return tokenizers_lib.load(hf_dir)
  path = os.path.join(workdir, "tokenizer", "spm.model")
  if not os.path.exists(path):
    if not train_if_missing:
      raise InputError(f"{path}: not found and config.tokenizer.path is empty; pass --tokenizer")
    if jax.process_index() == 0:
      tc = config.tokenizer
      log.info("training a %d-piece %s tokenizer on the corpus -> %s", tc.vocab_size,
               tc.model_type, path)
      texts = training_texts(config.data, opened=opened)
      tokenizer_lib.train_sentencepiece(texts, os.path.dirname(path), tc.vocab_size,
                                        tc.model_type)
      got = tokenizer_lib.SentencePieceTokenizer(path).vocab_size
      if got < int(tc.vocab_size):  # sentencepiece's soft limit: never silent
        log.warning("tokenizer.vocab_size=%d: the corpus supports only %d pieces; the "
                    "tokenizer has %d", tc.vocab_size, got, got)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tokenizer")
  return tokenizer_lib.SentencePieceTokenizer(path)


def build_pipeline(config, tokenizer, batch_shards: int | None = None, opened=None
                   ) -> pair_pipeline.PairPipeline:
  """`batch_shards`: data x fsdp of the run's mesh (default: the mesh on every device); the
  packing groups (data.packing) are one shard's share of one micro-batch. `opened`:
  open_configured_sources' result, when the caller has it."""
  import jax
  d = config.data
  if batch_shards is None:
    data, fsdp, _ = mesh_lib.resolve_shape(config.mesh, jax.device_count())
    batch_shards = data * fsdp
  comps, weights, stats = opened or open_configured_sources(d)
  corpus = getattr(comps[0], "store", None) if comps else None   # data.cache_dir
  tokens = corpus and _by_process_0(lambda build: corpus.tokens(tokenizer, build))
  pipe = pair_pipeline.PairPipeline(
      comps, weights, tokenizer, global_batch=int(config.train.global_batch),
      max_length=int(d.max_length), mask_prob=float(d.mask_prob),
      max_predictions=int(d.max_predictions_per_seq), seed=int(d.seed),
      temperature=float(d.temperature), dedup=bool(d.dedup),
      load_stats=stats, cls_input=str(config.loss.cls_input),
      mlm_input=str(config.loss.mlm_input), packing=bool(d.packing),
      packed_rows=int(d.packed_rows), packed_pair_rows=int(d.packed_pair_rows),
      batch_shards=batch_shards, micro_batches=config_lib.packing_micro_batches(config.train),
      table=corpus.table(tokens) if corpus else None, tokens=tokens,
      stream_extra={  # which records are usable depends on these too
          f"data.{k}": getattr(d, k) for k in ("max_chars", "long_lines", "invalid_utf8")})
  if pipe.mlm_only and float(config.loss.weight) != 0.0:
    from bepa_jax.errors import ConfigError
    raise ConfigError("data.source has only mono: sources (MLM-only rows): set loss.weight=0")
  top = sorted(pipe.probs.items(), key=lambda kv: -kv[1])[:8]
  log.info("data: %d language pairs, %d pairs; mixture %s%s; %s", len(comps),
           sum(len(c) for c in comps), ", ".join(f"{k} {v:.3f}" for k, v in top),
           " ..." if len(comps) > 8 else "", stats.report())
  log.info("%s", pipe.packing_summary())
  return pipe
