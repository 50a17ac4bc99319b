"""BEPA on a BERT-base (mBERT-style) encoder: continued pretraining from a local mBERT copy,
or from scratch with our own sentencepiece vocabulary when `init.hf_dir` is empty.

  bepa-train --config configs/bepa_mbert_base.py --workdir gs://BUCKET/bepa-mbert \
    --config.init.hf_dir=/path/to/bert-base-multilingual-cased
"""
from bepa_jax.config import defaults as default_config


def get_config():
  c = default_config.get_config()
  c.init.hf_dir = ""                               # e.g. a local bert-base-multilingual-cased
  c.model.family = "bert"
  c.model.hidden_size = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.intermediate_size = 3072
  c.model.max_position_embeddings = 512
  c.model.type_vocab_size = 2
  c.model.layer_norm_eps = 1e-12
  c.model.hidden_dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.dtype = "bfloat16"
  c.model.remat = "dots_saveable"
  c.model.scan_layers = True
  c.tokenizer.vocab_size = 119_547                 # from scratch: mBERT's vocabulary size
  c.data.source = "tfds:xnli:test;tfds:xnli:validation"
  c.loss.cls_input = "clean"                       # [CLS] from clean passes: +8-10 points of
                                                   # retrieval in bench/objective_study.py
  c.data.max_length = 128
  c.data.max_predictions_per_seq = 20
  c.data.packing = True                            # several sentences per row, exact
                                                   # (docs/packing.md); False = padded
  c.data.workers = 8                               # processes building the next batches
                                                   # on each host (docs/data.md: sizing them)
  c.optim.learning_rate = 5e-5
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 1000
  c.train.global_batch = 4096
  c.train.steps = 20_000
  c.train.log_every = 50
  c.checkpoint.every_steps = 1000
  return c
