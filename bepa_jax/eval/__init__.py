"""Evaluation: cross-lingual retrieval, embedding-space diagnostics and plots.

  metrics.py      numpy metric functions (effective rank, alignment/uniformity, retrieval, margin)
  embed.py        jitted, batch-sharded [CLS] / mean-pooled sentence embeddings
  retrieval.py    Tatoeba (LASER layout) and aligned parallel files -> top-1 accuracies
  diagnostics.py  spectrum, PC1 share, pair vs random cosines -> JSON and PNG plots
  suite.py        one evaluation pass over the aligned sets (bepa-eval, periodic eval, bepa-sweep)
  periodic.py     the `eval.*` hook of the training loop
The model to evaluate is loaded by bepa_jax/loading.py; `bepa-eval` is bepa_jax/cli/eval.py.
"""
