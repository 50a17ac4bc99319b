"""Input side: tokenizers, parallel-text sources, MLM masking and the batch pipeline."""
