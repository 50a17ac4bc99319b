"""The same BEPA step in PyTorch with HF transformers `BertForMaskedLM`: the baseline.

MLM + lambda * symmetric InfoNCE on the last-layer [CLS] (L2-normalised, tau), AdamW with
weight decay off biases/LayerNorm and grad-norm clipping, dropout on: the step ours runs.
Two variants of the MLM head:
  hf      : the usual HF call, `labels` with -100 off the masked positions (logits everywhere)
  gathered: the encoder, then `model.cls` at the masked positions only (what ours does)

It runs in a worker process of its own (`TorchWorker`, `python bench/torch_baseline.py
--serve ...`), so that its host allocator is set on its own (glibc defaults, as PyTorch users
run it, or the same `retain` setting as ours) and the two frameworks' thread pools and heaps
never share a process. bench/step.py alternates steps of ours and of each worker.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

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


MALLOC_SETTINGS = ("system", "retain")  # glibc defaults / bepa_jax.host_memory's "retain"


class TorchWorker:
  """A PyTorch step in a child process: `worker()` runs one step there and returns its seconds."""

  reports_seconds = True

  def __init__(self, config_name: str, overrides: dict, variant: str, host_malloc: str,
               matmul_n: int = 2048):
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--config", config_name,
           "--variant", variant, "--host_malloc", host_malloc, "--matmul_n", str(matmul_n),
           "--overrides", json.dumps(overrides)]
    self.name = f"torch_{variant}/{host_malloc}"
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = self.proc.stdout.readline()
    if line.strip() != "ready":
      raise RuntimeError(f"{self.name}: worker failed to start (exit {self.proc.wait()})")

  def _ask(self, what: str) -> float:
    self.proc.stdin.write(what + "\n")
    self.proc.stdin.flush()
    return float(self.proc.stdout.readline())

  def __call__(self) -> float:
    return self._ask("step")

  def matmul(self) -> float:
    return self._ask("matmul")

  def matmul_fn(self):
    """The worker's n^3 fp32 matmul, as a timed fn for `harness.interleaved`."""
    fn = lambda: self.matmul()  # noqa: E731
    fn.reports_seconds = True
    return fn

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def _serve(argv=None):
  p = argparse.ArgumentParser(prog="bench/torch_baseline.py")
  p.add_argument("--serve", action="store_true", required=True)
  p.add_argument("--config", required=True)
  p.add_argument("--variant", choices=("hf", "gathered"), required=True)
  p.add_argument("--host_malloc", choices=MALLOC_SETTINGS, required=True)
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--overrides", default="{}")
  args = p.parse_args(argv)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import harness
  from bepa_jax import host_memory
  host_memory.configure(args.host_malloc)  # before torch starts its threads
  config = harness.make_config(args.config, **json.loads(args.overrides))
  step = build_torch_step(config, harness.synthetic_batch(config), args.variant)
  mm, _ = torch_matmul(args.matmul_n)
  print("ready", flush=True)
  for line in sys.stdin:
    what = line.strip()
    if what == "quit":
      break
    fn = {"step": step, "matmul": mm}[what]
    t0 = time.perf_counter()
    fn()
    print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
  _serve()
