"""Config -> tokenizer and pipeline for the file/TFDS sources (train.py keeps `embedded`)."""
from __future__ import annotations

import logging

from bepa_jax.data import pair_pipeline, pretrained_tokenizers, sources
from bepa_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger("bepa")


def open_configured_sources(data_cfg):
  """(components, weights, load stats) of `data.source` under the config's text policy."""
  return sources.open_sources(
      str(data_cfg.source), sources.TextPolicy.from_config(data_cfg),
      sources.parse_pairs(str(data_cfg.get("pairs", ""))),
      str(data_cfg.get("tfds_data_dir", "")) or None)


def training_texts(data_cfg, limit: int = 2_000_000):
  """Distinct sentences of the configured sources (to train a tokenizer on first use)."""
  comps, _, _ = open_configured_sources(data_cfg)
  return sources.iter_texts(comps, limit)


def load_tokenizer(tok_cfg) -> tokenizer_lib.Tokenizer:
  return pretrained_tokenizers.load(str(tok_cfg.get("kind", "spm")), str(tok_cfg.path))


def build_pipeline(config, tokenizer) -> pair_pipeline.PairPipeline:
  d = config.data
  comps, weights, stats = open_configured_sources(d)
  pipe = pair_pipeline.PairPipeline(
      comps, weights, tokenizer, global_batch=int(config.train.global_batch),
      max_length=int(d.max_length), mask_prob=float(d.mask_prob),
      max_predictions=int(d.max_predictions_per_seq), seed=int(d.seed),
      temperature=float(d.get("temperature", 1.0)), dedup=bool(d.get("dedup", True)),
      load_stats=stats)
  if pipe.mlm_only and float(config.loss.weight) != 0.0:
    from bepa_jax.errors import ConfigError
    raise ConfigError("data.source has only mono: sources (MLM-only rows): set loss.weight=0")
  top = sorted(pipe.probs.items(), key=lambda kv: -kv[1])[:8]
  log.info("data: %d language pairs, %d pairs; mixture %s%s; %s", len(comps),
           sum(len(c) for c in comps), ", ".join(f"{k} {v:.3f}" for k, v in top),
           " ..." if len(comps) > 8 else "", stats.report())
  return pipe
