"""Model FLOPs of one train step: the analytic count of its useful work on real tokens.

MFU in MaxText's, levanter's and PaLM's sense divides this count (not the compiler's) by the
step time and the chips' peak, so padding, remat recompute, GradCache's second forward and
element-wise work (softmax, GELU, LayerNorm, the optimizer) do not count as work done. XLA's
own flops count them all: that ratio is the hardware-flops utilisation (report.py).

Per encoder pass over S sequences of l real tokens (h hidden, n layers, I intermediate):
  dense      2 x n(4h^2 + 2hI) x S l       the Q, K, V, output and MLP matmuls (6N per token
                                           with the backward, N = the layers' matmul weights)
  attention  4 x n h x S l^2               QK^T and PV (PaLM's 12 n h T per token, T = l)
times 3 for a pass that is trained (forward + backward), 1 for a forward-only one (the EMA
target's); plus the MLM head at the real masked positions, 6 (h^2 + hV) each (dense transform
and the tied decoder), and the contrastive logits, 6 x 2 B C d (each direction's B x C).
"""
from __future__ import annotations

from bepa_jax.data import batch_spec


def model_flops(*, hidden: int, layers: int, intermediate: int, vocab: int, pairs: int,
                tokens_per_sentence: float, predictions_per_sentence: float,
                passes: tuple[tuple[str, bool], ...] = (("sentences", True),),
                contrastive_columns: int | None = None) -> dict:
  """The step's model FLOPs by term. `passes`: (grid, trained) per encoder pass, grid
  "sentences" (2B sequences of l tokens) or "pairs" (TLM: B sequences of 2l tokens); k
  predictions per sentence either way (TLM: 2k per pair)."""
  h, n, m, B = hidden, layers, float(tokens_per_sentence), pairs
  dense = attention = 0.0
  tokens = 0.0
  for grid, trained in passes:
    seqs, length = (2 * B, m) if grid == "sentences" else (B, 2 * m)
    times = 3 if trained else 1
    dense += times * 2 * n * (4 * h * h + 2 * h * intermediate) * seqs * length
    attention += times * 4 * n * h * seqs * length ** 2
    tokens += seqs * length
  predictions = 2 * B * predictions_per_sentence
  head = 6 * (h * h + h * vocab) * predictions
  C = B if contrastive_columns is None else contrastive_columns
  contrastive = 6 * 2 * B * C * h
  return dict(dense=dense, attention=attention, mlm_head=head, contrastive=contrastive,
              total=dense + attention + head + contrastive, real_tokens=tokens,
              predictions=predictions, tokens_per_sentence=m)


def masked_per_sentence(tokens_per_sentence: float, mask_prob: float, max_predictions: int
                        ) -> float:
  """data/masking.py's k = clip(round(p n), 1, P) of n content tokens, at the mean length."""
  return min(float(max_predictions), max(1.0, mask_prob * (tokens_per_sentence - 2)))


def step_model_flops(config, model_cfg, tokens_per_sentence: float = 0.0) -> dict:
  """model_flops of `config`'s step: its encoder passes (batch_spec.encoder_mask_keys), its
  masked positions and candidates. Without the data's mean real tokens per sentence every
  sentence counts as data.max_length long (said in `tokens_from`)."""
  L = int(config.data.max_length)
  m = float(tokens_per_sentence) if tokens_per_sentence else float(L)
  loss = config.loss
  pair = str(loss.mlm_input) == "pair"
  keys = batch_spec.encoder_mask_keys(str(loss.cls_input), str(loss.mlm_input),
                                      float(loss.ema_decay) > 0)
  passes = [("sentences", True)]  # the [CLS] pass (and the MLM pass with cls_input=masked)
  if str(loss.cls_input) == "clean":
    passes.append(("pairs" if pair else "sentences", True))
  passes += [("sentences", False)] * (len(keys) - len(passes))  # the EMA target's forward
  k = masked_per_sentence(m, float(config.data.mask_prob), int(config.data.max_predictions_per_seq))
  B = int(config.train.global_batch)
  out = model_flops(
      hidden=model_cfg.hidden_size, layers=model_cfg.num_layers,
      intermediate=model_cfg.intermediate_size, vocab=model_cfg.vocab_size, pairs=B,
      tokens_per_sentence=m, predictions_per_sentence=k, passes=tuple(passes),
      contrastive_columns=2 * B if bool(loss.same_language_negatives) else B)
  out["tokens_from"] = ("--tokens_per_sentence" if tokens_per_sentence else
                        f"data.max_length={L} (no --tokens_per_sentence: every sentence full)")
  out["passes"] = [f"{g}{'' if t else ' (forward only)'}" for g, t in passes]
  return out
