"""The same BEPA step in PyTorch with HF transformers `BertForMaskedLM`: the baseline.

MLM + lambda * symmetric InfoNCE on the last-layer [CLS] (L2-normalised, tau), AdamW with
weight decay off biases/LayerNorm and grad-norm clipping, dropout on: the step ours runs.
Two variants of the MLM head:
  hf      : the usual HF call, `labels` with -100 off the masked positions (logits everywhere)
  gathered: the encoder, then `model.cls` at the masked positions only (what ours does)
"""
from __future__ import annotations

import numpy as np


def build_torch_step(config, batch_np: dict, variant: str = "hf", threads: int | None = None):
  import torch
  from transformers import BertConfig, BertForMaskedLM

  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  m = config.model
  hf_cfg = BertConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                      num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                      intermediate_size=m.intermediate_size, hidden_act="gelu",
                      hidden_dropout_prob=m.hidden_dropout,
                      attention_probs_dropout_prob=m.attention_dropout,
                      max_position_embeddings=m.max_position_embeddings,
                      type_vocab_size=m.type_vocab_size, layer_norm_eps=m.layer_norm_eps,
                      pad_token_id=m.pad_token_id)
  model = BertForMaskedLM(hf_cfg)
  model.train()
  o = config.optim
  decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
  no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps)
  tau, lam = float(config.loss.temperature), float(config.loss.weight)

  B, _, L = batch_np["input_ids"].shape
  flat = lambda a: torch.from_numpy(np.ascontiguousarray(a.reshape((2 * B,) + a.shape[2:])))
  ids, tt, am = flat(batch_np["input_ids"]).long(), flat(batch_np["token_type_ids"]).long(), \
      flat(batch_np["attention_mask"]).long()
  pos, lab = flat(batch_np["mlm_positions"]).long(), flat(batch_np["mlm_ids"]).long()
  labels = torch.full_like(ids, -100)
  labels.scatter_(1, pos, lab)

  def contrastive(cls):
    z = torch.nn.functional.normalize(cls.view(B, 2, -1), dim=-1)
    logits = z[:, 0] @ z[:, 1].T / tau
    target = torch.arange(B)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, target) + ce(logits.T, target))

  def step():
    if variant == "hf":
      out = model(input_ids=ids, token_type_ids=tt, attention_mask=am, labels=labels,
                  output_hidden_states=True)
      mlm, cls = out.loss, out.hidden_states[-1][:, 0]
    else:
      hidden = model.bert(input_ids=ids, token_type_ids=tt, attention_mask=am)[0]
      picked = torch.gather(hidden, 1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
      logits = model.cls(picked)
      mlm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                              lab.reshape(-1))
      cls = hidden[:, 0]
    loss = mlm + lam * contrastive(cls)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
    opt.step()
    return loss.item()

  return step


def torch_matmul(n: int = 2048):
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  with torch.no_grad():
    a @ b
  def run():
    with torch.no_grad():
      a @ b
  return run, 2 * n ** 3
