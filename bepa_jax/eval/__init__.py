"""Evaluation: cross-lingual retrieval, embedding-space diagnostics and plots, `bepa-eval`.

  metrics.py      numpy metric functions (effective rank, alignment/uniformity, retrieval, margin)
  embed.py        jitted, batch-sharded [CLS] / mean-pooled sentence embeddings
  retrieval.py    Tatoeba (LASER layout) and aligned parallel files -> top-1 accuracies
  diagnostics.py  spectrum, PC1 share, pair vs random cosines -> JSON and PNG plots
  loading.py      a checkpoint workdir or an HF directory -> (model, params, tokenizer)
  periodic.py     the `eval.*` hook of the training loop
  cli.py          `bepa-eval`
"""
