"""The BEPA loss: encode -> [CLS] -> contrastive on [CLS], + MLM at the masked positions."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from bepa_jax import model as model_lib
from bepa_jax.objective import heads
from bepa_jax.objective import infonce
from bepa_jax.objective.mlm import chunked_mlm_loss, mlm_loss


def _flat(a):
  """[B, 2, ...] -> [2B, ...]: both sides as one batch (each device's rows stay local)."""
  return a.reshape((2 * a.shape[0],) + a.shape[2:])


class Objective:
  """The BEPA loss in the pieces GradCache needs: encode -> [CLS] -> contrastive on [CLS].

  The contrastive term is infonce.sharded_infonce on the encoder's [CLS]; the options
  (infonce.Options, heads.py: projector, predictor, learned tau, EMA target) only add to it.
  """

  def __init__(self, model, loss_cfg, mesh, head=None):
    self.model, self.loss_cfg, self.mesh, self.head = model, loss_cfg, mesh, head
    self.cls_input = str(loss_cfg.cls_input)
    self.mlm_input = str(loss_cfg.mlm_input)
    self.weight = float(loss_cfg.weight)
    self.temperature = float(loss_cfg.temperature)
    self.opts = infonce.Options.from_config(loss_cfg)
    self.mlm_chunk = int(loss_cfg.mlm_vocab_chunk)  # > 0: mlm.chunked_mlm_loss, no [N, V] logits

  def encode(self, params, batch, rng, with_mlm: bool = True):
    """-> ([CLS] [B, 2, H], (MLM ce sum, correct, count) or None). Both sides as one [2B] batch.

    loss.cls_input=masked: one pass; [CLS] and MLM both from the masked sentences.
    loss.cls_input=clean (the authors'): [CLS] from a pass over the clean sentences, MLM from
    its own pass over `mlm_input_ids`: the masked sentences [B, 2, L] (mlm_input=sentence) or
    one masked pair sequence per row [B, L] (mlm_input=pair, TLM). The two passes draw
    dropout from independent keys split off `rng`, so GradCache's re-run is exact.
    Packed batches (batch["segment_ids"], data.packing) hold the same sentences in [G, R, L]
    rows; [CLS] and MLM positions are gathered by index, in the pairs' order.
    """
    enc = {"params": model_lib.encoder_params(params)}
    if self.cls_input == "masked":
      out = self._apply(enc, batch, "input_ids", "sentence", with_mlm, rng, False)
      mlm = None
      if with_mlm:
        mlm = self._mlm(out, _flat(batch["mlm_ids"]), _flat(batch["mlm_weights"]))
      return out["cls"], mlm
    rng_cls, rng_mlm = jax.random.split(rng)
    cls = self._apply(enc, batch, "input_ids", "sentence", False, rng_cls, False)["cls"]
    if not with_mlm:
      return cls, None
    mode = "pair" if self.mlm_input == "pair" else "sentence"
    out = self._apply(enc, batch, "mlm_input_ids", mode, True, rng_mlm, False)
    labels, weights = batch["mlm_ids"], batch["mlm_weights"]
    if mode == "sentence":
      labels, weights = _flat(labels), _flat(weights)
    return cls, self._mlm(out, labels, weights)

  def _mlm(self, out, labels, weights):
    """(ce sum, correct, count) of one pass's MLM output: dense logits or streamed chunks."""
    if not self.mlm_chunk:
      return mlm_loss(out["mlm_logits"], labels, weights)
    embedding, bias = out["mlm_decoder"]
    return chunked_mlm_loss(out["mlm_hidden"], embedding, bias, labels, weights, self.mlm_chunk)

  def _apply(self, enc, batch, ids_key, mode, with_mlm, rng, deterministic):
    """One encoder pass over batch[ids_key] -> {"cls" [B, 2, H], "mlm_logits" [N, P, V]}
    (with loss.mlm_vocab_chunk: "mlm_hidden" [N, P, H] and "mlm_decoder" instead).

    mode sentence: both sides [B, 2, L] as [2B, L] (or packed [G, R, L] with
    batch["segment_ids"]); pair: the TLM sequences [B, L] (or packed with mlm_segment_ids).
    """
    B = batch["mlm_weights"].shape[0]
    ids = batch[ids_key]
    rngs = None if deterministic else {"dropout": rng}
    decode = not self.mlm_chunk
    seg_key, mask_key = (("segment_ids", "attention_mask") if mode == "sentence" else
                         ("mlm_segment_ids", "mlm_attention_mask"))
    if seg_key in batch:  # packed: per-pair indices -> per-group indices, pairs in order
      G = ids.shape[0]
      group = lambda a: a.reshape((G, -1))
      pos = group(batch["mlm_positions"]) if with_mlm else None
      out = self.model.apply(enc, ids, jnp.zeros_like(ids), None, pos,
                             deterministic=deterministic, rngs=rngs,
                             segment_ids=batch[seg_key], cls_index=group(batch["cls_index"]),
                             mlm_decode=decode)
      if with_mlm:  # [G, n, V] -> the unpacked layout [2B, P, V] or [B, 2P, V] (or H for V)
        rows = 2 * B if mode == "sentence" else B
        key = "mlm_logits" if decode else "mlm_hidden"
        out[key] = out[key].reshape((rows, -1, out[key].shape[-1]))
    elif mode == "pair":
      out = self.model.apply(enc, ids, jnp.zeros_like(ids), batch[mask_key],
                             batch["mlm_positions"] if with_mlm else None,
                             deterministic=deterministic, rngs=rngs, mlm_decode=decode)
    else:
      out = self.model.apply(enc, _flat(ids), _flat(batch["token_type_ids"]),
                             _flat(batch[mask_key]),
                             _flat(batch["mlm_positions"]) if with_mlm else None,
                             deterministic=deterministic, rngs=rngs, mlm_decode=decode)
    out["cls"] = out["cls"].reshape(B, 2, -1)
    return out

  def target(self, ema_params, batch):
    """Projected [CLS] [B, 2, D] of the EMA target encoder (no dropout, no gradient)."""
    ema_params = jax.lax.stop_gradient(ema_params)
    B = batch["mlm_weights"].shape[0]
    out = self._apply({"params": model_lib.encoder_params(ema_params)}, batch, "input_ids",
                      "sentence", False, None, True)
    z = out["cls"].reshape(2 * B, -1)
    if self.head is not None and self.head.projector:
      proj = heads.head_params(ema_params)["proj"]
      z = heads.MLP(self.head.projector).apply({"params": proj}, z)
    return jax.lax.stop_gradient(z.reshape(B, 2, -1))

  def contrastive(self, params, cls, target, batch):
    """Metrics dict (contrastive_loss, accuracies, cosines[, temperature]) from [CLS] [B, 2, H]."""
    zx, zy = cls[:, 0], cls[:, 1]
    if self.weight == 0.0:  # pure MLM; the contrastive numbers are still logged
      zx, zy = jax.lax.stop_gradient(zx), jax.lax.stop_gradient(zy)
    tau, cx, cy = self.temperature, None, None
    if self.head is not None:
      hp = heads.head_params(params)
      tau = heads.temperature(self.head, hp, self.loss_cfg)
      apply = lambda method, z: self.head.apply({"params": hp}, z, method=method)
      zx, zy = (apply(heads.ContrastiveHead.project, z) for z in (zx, zy))
      if self.head.predictor:  # the predictor maps context to target: anchors only
        cx, cy = zx, zy
        zx, zy = (apply(heads.ContrastiveHead.predict, z) for z in (zx, zy))
    if target is not None:
      cx, cy = target[:, 0], target[:, 1]
    con = infonce.sharded_infonce(zx, zy, tau, self.mesh, self.opts, cx, cy,
                                  batch.get("text_hash"))
    if not isinstance(tau, float):
      con["temperature"] = tau
    return con

  def combine(self, ce, correct, count, con, mlm_norm=None):
    """MLM = ce / mlm_norm; mlm_norm defaults to this batch's count of masked positions.

    A part of a larger batch passes its share of the whole batch's count instead, so that
    the MLM loss has one definition: CE sum over the step's masked positions / their count.
    """
    norm = jnp.maximum(count, 1.0) if mlm_norm is None else mlm_norm
    mlm = ce / norm
    loss = mlm + self.weight * con["contrastive_loss"] if self.weight else mlm
    return loss, {"loss": loss, "mlm_loss": mlm, "mlm_accuracy": correct / norm, **con}

  def loss_fn(self, params, batch, rng, ema_params=None, mlm_norm=None):
    """`mlm_norm`: the MLM divisor (see `combine`); None = this batch's own count."""
    cls, (ce, correct, count) = self.encode(params, batch, rng)
    target = None if ema_params is None else self.target(ema_params, batch)
    return self.combine(ce, correct, count, self.contrastive(params, cls, target, batch),
                        mlm_norm)
