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
      hidden_dropout=0.0,            # BERT uses 0.1; the tiny quickstart learns faster without
      attention_dropout=0.0,
      initializer_range=0.02,
      dtype="float32",               # compute dtype: float32 | bfloat16 (params stay float32)
      remat="none",                  # none | full | dots_saveable
      scan_layers=False,             # nn.scan over layers: O(1) compile time in depth
      fused_qkv=False,               # one [H, 3H] Q/K/V matmul; same parameters and names
      weight_grads_fp32=False,       # bfloat16 compute: each weight's gradient leaves its matmul
                                     # in float32, so the sum over batch shards is float32 on TPU
  ))

  # --- Objective: L = L_mlm + weight * L_con (symmetric InfoNCE over the global batch).
  #   s_ij = cos(a(x_i), c(y_j)),  l_ij = (s_ij - margin * [i = j]) / tau
  #   L_x->y = mean_i [ logsumexp_{j in pool(i)} l_ij - l_ii ],  L_y->x likewise with x <-> y
  # a = anchors (context: encoder [CLS] -> projector -> predictor), c = candidates (target:
  # [CLS] -> projector, or the EMA target encoder). All defaults = plain symmetric InfoNCE.
  c.loss = ml_collections.ConfigDict(dict(
      cls_input="masked",            # [CLS] for InfoNCE from: masked (the MLM pass; one pass) |
                                     # clean (own passes over the unmasked sentences; the authors')
      mlm_input="sentence",          # MLM on: sentence (each side alone) | pair (TLM: one
                                     # [CLS] x [SEP] [CLS] y [SEP] per pair; needs cls_input=clean)
      weight=1.0,                    # lambda; 0 gives pure MLM (contrastive still logged)
      temperature=0.07,              # tau (its initial value if learned)
      learn_temperature=False,       # tau = clip(exp(log_tau), min, max), log_tau in params
      temperature_min=0.01,          # clamp of a learned tau (0.01 = CLIP's logit scale 100)
      temperature_max=1.0,
      margin=0.0,                    # m: additive margin on the positive logit (LaBSE: 0.3)
      symmetric="mean",              # mean: (L_x->y + L_y->x)/2 | sum | x2y | y2x (one direction)
      negatives="global",            # global: all B rows (grad through all_gather) | local: the
                                     # device's b rows | global_stopgrad: B rows, grad via own b
      same_language_negatives=False, # pool(i) = {c(y_j)} + {c(x_j)} (candidates concat[z_y, z_x])
      mask_self=True,                # with same-language negatives, drop c(x_i) (the anchor's own
                                     # sentence); False = the reference code's unmasked e^{s_ii/tau}
      mask_duplicates=False,         # drop candidates whose text equals the positive's (needs the
                                     # batch's text_hash; no-op without it)
      projector_layers=0,            # MLP on [CLS] before L2-norm, both sides; 0 = none
      projector_dim=0,               # its width; 0 = hidden size
      predictor_layers=0,            # MLP on the anchor side only (JEPA); 0 = none
      predictor_dim=0,               # its hidden width; 0 = projector output size
      ema_decay=0.0,                 # > 0: candidates come from an EMA target encoder (+ projector),
                                     # stop-gradient; ema <- d * ema + (1 - d) * online, per step
      contrastive_chunk=0,           # > 0: streaming log-sum-exp over this many candidate columns
                                     # (b x chunk logits per device, not b x B; bepa_jax/objective/infonce.py)
      mlm_vocab_chunk=0,             # > 0: MLM cross-entropy streamed over this many vocabulary rows
                                     # at a time (no [positions, V] logits; e.g. 16384 for XLM-R's
                                     # V = 250,002, any V; bepa_jax/objective/mlm.py); 0 = dense
  ))

  # --- Start from a pretrained HF checkpoint (continued pretraining, as in the paper).
  c.init = ml_collections.ConfigDict(dict(
      hf_dir="",                     # local dir: config.json + model.safetensors (+ tokenizer)
      allow_pickle=False,            # also read pytorch_model.bin (torch.load weights_only=True)
  ))

  # --- Data.
  c.data = ml_collections.ConfigDict(dict(
      source="embedded",             # the bundled multilingual corpus (bepa_jax/resources), or
                                     # `;`-separated KIND:ARG[@weight] (bepa_jax/data/sources.py):
                                     # aligned:DIR/train.{en,de} | tatoeba:DIR[:deu,fra] | tsv:F |
                                     # jsonl:F | tfds:NAME[:SPLIT] | mono:LANG=F (MLM only)
      languages="en,de,fr,es,ru,el", # languages of the embedded corpus to draw pairs from
      pairs="",                      # other sources: language pairs to use, e.g. "en-de,en-fr";
                                     # "" = every pair a source holds
      temperature=1.0,               # p(pair) ~ weight * size^(1/T): 1 = by size, large = uniform
      dedup=True,                    # redraw rows whose sentence already is in the batch
      max_chars=2000,                # lines longer than this are over-long (before tokenising)
      long_lines="skip",             # skip | truncate (over-long lines; counted and logged)
      invalid_utf8="error",          # error (file:line) | skip (counted and logged)
      tfds_data_dir="",              # TFDS data_dir ("" = TFDS default); array_record, prepared
      cache_dir="",                  # the record store: the corpus parsed and tokenised once,
                                     # keyed by the content of corpus and tokenizer, reused by later
                                     # runs and every host (shared storage); "" = none, the corpus is
                                     # read (and with packing tokenised) at every start
      max_length=48,                 # tokens per sentence incl. [CLS] and [SEP]; the row length
      packing=True,                  # several sentences per row of max_length (block-diagonal
                                     # attention, exact; bepa_jax/data/packing.py); False = one
                                     # sentence per row, padded
      packed_rows=0,                 # rows per packing group (one batch shard's share of one
                                     # micro-batch); 0 = from the data's lengths at start-up
      packed_pair_rows=0,            # the same for the TLM pair sequences (loss.mlm_input=pair)
      mask_prob=0.15,
      max_predictions_per_seq=5,
      seed=0,
      workers=0,                     # processes that build the next steps' batches while a step
                                     # runs (grain; one core each; docs/data.md sizes them for a
                                     # pod host); 0 = built in the training process between steps
      prefetch=2,                    # batches built ahead of the running step (with workers);
                                     # >= 1 also puts the next one on the devices a step early
      continue_on_new_data=False,    # resume although the data settings above (or the tokenizer)
                                     # changed: the new stream starts at the restored step; False
                                     # = such a resume stops, naming the changed keys
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      path="",                       # existing tokenizer; empty = train a sentencepiece model on the
                                     # configured data on first use (cached in the workdir)
      kind="spm",                    # of `path`: spm (ours: [PAD]=0..[MASK]=4) | xlmr_spm (fairseq
                                     # layout: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last) | hf_json
      vocab_size=1000,
      model_type="unigram",          # unigram | bpe
  ))

  # --- Optimisation.
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=2e-3,
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
      gradcache_chunks=0,            # > 1: GradCache, the pool is the full global batch and
                                     # activation memory is one chunk of global_batch / chunks
      steps=1000,                    # 0 = save the initial state (init.hf_dir's) as step 0, exit
      seed=0,
      dropout_rng="threefry2x32",    # dropout's PRNG: threefry2x32 | rbg (XLA's RngBitGenerator,
                                     # the TPU's hardware generator: cheaper, and a workaround
                                     # for the libtpu crash bepa-compile names) | unsafe_rbg;
                                     # init is threefry either way
      log_every=50,
      profile_start=0,               # jax.profiler trace of steps [start, start + profile_steps)
      profile_steps=0,               # into WORKDIR/profile; 0 = off (start >= 2 skips compilation)
      host_malloc="auto",            # auto | retain | system: keep freed host memory so XLA:CPU's
                                     # per-step buffers don't page-fault (bepa_jax/host_memory.py);
                                     # auto = retain when the CPU is the accelerator
  ))

  # --- Checkpoints in WORKDIR/checkpoints (bepa_jax/checkpoint/store.py); rerunning resumes from them.
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=100,               # save every N steps (0 = off); always after the last step
      every_minutes=30.0,            # and when T minutes passed since the last save (0 = off)
      keep=3,                        # most recent checkpoints kept
      keep_best_metric="",           # also keep the best by this saved metric, e.g. "loss"
      keep_best_mode="min",          # min | max
      async_save=True,               # write in the background while training goes on
  ))

  # --- Device mesh. -1 = all remaining devices. dcn_data > 1 spreads `data` over slices.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1,
      fsdp=1,
      tensor=1,
      dcn_data=1,
      shard_optimizer=False,         # ZeRO-1: Adam's mu and nu split over the batch axes (data,
                                     # fsdp) too; each shard updates its slice, the new parameters
                                     # are gathered back (bepa_jax/training/state.py)
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

  # --- Periodic evaluation (bepa_jax/eval/periodic.py), logged as eval/... with the metrics.
  c.eval = ml_collections.ConfigDict(dict(
      every_steps=0,                 # 0 = off; else every N steps and after the last step
      tatoeba_dir="",                # LASER-layout dir: tatoeba.xxx-eng.{xxx,eng}
      langs="deu,fra",               # Tatoeba languages ("" = every language in the dir)
      parallel="",                   # comma-separated line-aligned files (.gz ok), e.g. a test set
      max_sentences=500,             # per set (0 = all)
      batch_size=64,                 # sentences per forward pass (rounded up to the batch shards)
      pooling="cls,mean",            # cls and/or mean
      margin="",                     # "" (cosine) | ratio | distance: also score with a BUCC margin
  ))
  return c
