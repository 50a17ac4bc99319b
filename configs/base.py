"""BEPA on a BERT-base encoder trained from scratch: the pod-scale default that `launch/`
names, and the `base` shape of bench/step.py (12 layers, hidden 768, 32k pieces, 128 tokens).

  python launch/tpu.py --name bepa-v4 --zone us-central2-b --accelerator-type v4-32 train \
    --config configs/base.py --workdir gs://BUCKET/runs/base

Parallel data from TFDS (prepared as array_record, see docs/data.md): XNLI's 15-way premises.
"""
from bepa_jax.config import defaults as default_config


def get_config():
  c = default_config.get_config()
  c.model.family = "bert"
  c.model.hidden_size = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.intermediate_size = 3072
  c.model.max_position_embeddings = 512
  c.model.hidden_dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.dtype = "bfloat16"
  c.model.remat = "dots_saveable"
  c.model.scan_layers = True
  c.tokenizer.vocab_size = 32_000
  c.data.source = "tfds:xnli:test;tfds:xnli:validation"
  c.data.max_length = 128
  c.data.max_predictions_per_seq = 20
  c.data.packing = True                            # several sentences per row, exact
                                                   # (docs/packing.md); False = padded
  c.data.workers = 8                               # processes building the next batches
                                                   # on each host (docs/data.md: sizing them)
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 1000
  c.train.global_batch = 4096
  c.train.steps = 20_000
  c.checkpoint.every_steps = 1000
  return c
