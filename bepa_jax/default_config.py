"""The embedded default configuration: a tiny BEPA run on the bundled corpus, on CPU.

Every other config in `configs/` starts from this one and changes what it needs,
so this file is also the reference list of every key the trainer understands.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- Encoder (BERT or XLM-R family). vocab_size=0 means "take it from the tokenizer".
  c.model = ml_collections.ConfigDict(dict(
      family="bert",                 # "bert" (mBERT, BERT) or "xlmr" (XLM-R, RoBERTa)
      vocab_size=0,
      hidden_size=128,
      num_layers=2,
      num_heads=4,
      intermediate_size=512,
      max_position_embeddings=64,
      type_vocab_size=2,             # XLM-R: 1
      layer_norm_eps=1e-12,          # XLM-R: 1e-5
      pad_token_id=0,                # XLM-R: 1
      hidden_dropout=0.1,
      attention_dropout=0.1,
      initializer_range=0.02,
      dtype="float32",               # compute dtype: float32 | bfloat16 (params stay float32)
      remat="none",                  # none | full | dots_saveable
      scan_layers=False,             # nn.scan over layers: O(1) compile time in depth
  ))

  # --- Objective: L = L_mlm + weight * L_con (symmetric InfoNCE over the global batch).
  c.loss = ml_collections.ConfigDict(dict(
      weight=1.0,                    # lambda; 0 gives pure MLM
      temperature=0.07,              # tau
  ))

  # --- Data.
  c.data = ml_collections.ConfigDict(dict(
      source="embedded",             # the bundled multilingual corpus (bepa_jax/resources)
      languages="en,de,fr,es,ru,el", # languages of a multi-way source to draw pairs from
      max_length=32,                 # tokens per sentence incl. [CLS] and [SEP]
      mask_prob=0.15,
      max_predictions_per_seq=5,
      seed=0,
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",                       # existing sentencepiece .model; empty = train one on first use
      vocab_size=1000,
      model_type="unigram",          # unigram | bpe
  ))

  # --- Optimisation.
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3,
      warmup_steps=20,
      schedule="linear",             # linear | cosine | constant (after warmup)
      end_lr_fraction=0.0,
      weight_decay=0.01,             # masked off biases and LayerNorm
      b1=0.9,
      b2=0.999,
      eps=1e-6,
      grad_clip_norm=1.0,            # 0 disables
  ))

  # --- Training loop.
  c.train = ml_collections.ConfigDict(dict(
      global_batch=32,               # sentence pairs per step, over all devices and hosts
      grad_accum_steps=1,            # micro-batches per step (each one its own negative pool)
      steps=200,
      seed=0,
      log_every=20,
  ))

  # --- Device mesh. -1 = all remaining devices. dcn_data > 1 spreads `data` over slices.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,
      fsdp=1,
      tensor=1,
      dcn_data=1,
      # logical axis -> mesh axes. Parameters and activations name logical axes only.
      rules=(
          ("batch", ("data", "fsdp")),
          ("vocab", "tensor"),
          ("embed", "fsdp"),
          ("heads", "tensor"),
          ("kv", None),
          ("mlp", "tensor"),
          ("position", None),
          ("type", None),
          ("layers", None),
          ("length", None),
          ("act_embed", None),
      ),
  ))
  return c
