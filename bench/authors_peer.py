"""The authors' step in PyTorch, for bench/authors_step.py (and bench/packing.py's HF column):
our pipeline's batch turned into their tensors, their three-pass HF MaskedLM step, and the
worker process each peer runs in (`python bench/authors_peer.py --serve ...`, driven over
stdin/stdout by PeerWorker). torch is imported only in the worker.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for _p in (REPO, BENCH):
  if _p not in sys.path:
    sys.path.insert(0, _p)

VARIANTS = ("hf", "gathered")
MALLOC_SETTINGS = ("system", "retain")


# ---------------------------------------------------------------------------- the peer's inputs
def peer_batch(batch: dict, mlm: str, pad_to: int | None = None) -> dict:
  """Our pipeline's batch -> the authors' tensors (numpy): padding cut to the longest per pass.

  Their collator pads clean x and clean y to one length, the longest sentence of the batch on
  either side (so that monolingual MLM can stack them); the pair sequences to the longest pair.
  `pad_to` (data.max_length): every pass padded to that length instead, as a static-shape
  PyTorch step would (bench/packing.py's HF column).
  """
  am = batch["attention_mask"]                       # [B, 2, L]
  Lc = pad_to or int(am.sum(-1).max())
  out = {"x_ids": batch["input_ids"][:, 0, :Lc], "x_mask": am[:, 0, :Lc],
         "y_ids": batch["input_ids"][:, 1, :Lc], "y_mask": am[:, 1, :Lc]}
  if mlm == "pair":
    mask = batch["mlm_attention_mask"]
    Lm = pad_to or int(mask.sum(-1).max())
    ids, mask = batch["mlm_input_ids"][:, :Lm], mask[:, :Lm]
    pos, lab, w = batch["mlm_positions"], batch["mlm_ids"], batch["mlm_weights"]
  else:  # x-batch then y-batch, as their collator concatenates them
    side_major = lambda a: np.concatenate([a[:, 0], a[:, 1]], axis=0)
    ids, mask = side_major(batch["mlm_input_ids"])[:, :Lc], side_major(am)[:, :Lc]
    pos, lab, w = (side_major(batch[k]) for k in ("mlm_positions", "mlm_ids", "mlm_weights"))
  labels = np.full(ids.shape, -100, np.int64)
  rows, cols = np.nonzero(w > 0)
  labels[rows, pos[rows, cols]] = lab[rows, cols]
  out.update(mlm_ids=ids, mlm_mask=mask, mlm_labels=labels)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def token_counts(batch: dict, mlm: str, peer: dict) -> dict:
  """Real sentence tokens, and tokens processed (with and without padding) by each framework."""
  am = batch["attention_mask"]
  B, _, L = am.shape
  real = int(am.sum())
  mlm_real = int(batch["mlm_attention_mask"].sum()) if mlm == "pair" else real
  ours_mlm = B * L if mlm == "pair" else 2 * B * L
  return dict(real=real, nonpad=real + mlm_real, ours=2 * B * L + ours_mlm,
              peer=peer["x_ids"].size + peer["y_ids"].size + peer["mlm_ids"].size)


def peer_spec(job) -> dict:
  """What a peer needs besides its batches (JSON): HF config, optimizer, loss settings."""
  from bepa_jax.hf import convert
  c = job.config
  o = c.optim
  return dict(family=job.model_cfg.family, hf_config=convert.hf_config_dict(job.model_cfg),
              lr=float(o.learning_rate), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
              weight_decay=float(o.weight_decay), clip=float(o.grad_clip_norm),
              tau=float(c.loss.temperature), weight=float(c.loss.weight))


def initial_weights(job) -> dict:
  """Our initial parameters as an HF state dict (numpy): both frameworks start equal."""
  import jax
  from bepa_jax.hf import convert
  return convert.params_to_hf_state_dict(jax.device_get(job.state.params), job.model_cfg)


# ---------------------------------------------------------------------------- the peer (PyTorch)
def peer_infonce(hx, hy, tau: float):
  """Symmetric InfoNCE as the authors': x -> y over concat[z_y, z_x], y -> x over
  concat[z_x, z_y], the positive at column i, the anchor's own similarity kept."""
  import torch
  zx, zy = (torch.nn.functional.normalize(h, dim=-1) for h in (hx, hy))
  target = torch.arange(zx.shape[0])
  lxy = zx @ torch.cat([zy, zx]).T / tau
  lyx = zy @ torch.cat([zx, zy]).T / tau
  ce = torch.nn.functional.cross_entropy
  return 0.5 * (ce(lxy, target) + ce(lyx, target))


def build_peer_step(spec: dict, batches: list, variant: str = "hf", state_dict=None,
                    threads: int | None = None):
  """-> (step, model): `step()` runs the authors' step on the next batch (cycling) and returns
  its loss (before the update); `step.last` holds the MLM and contrastive parts."""
  import torch
  import transformers

  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  xlmr = spec["family"] == "xlmr"
  cfg_cls = transformers.XLMRobertaConfig if xlmr else transformers.BertConfig
  model_cls = transformers.XLMRobertaForMaskedLM if xlmr else transformers.BertForMaskedLM
  model = model_cls(cfg_cls.from_dict(spec["hf_config"]))
  if state_dict is not None:
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=False)
    untied = [k for k in missing if ".decoder." not in k]
    if untied or unexpected:
      raise ValueError(f"weights do not fit the HF model: missing {untied}, extra {unexpected}")
  model.train()
  base, head = model.base_model, (model.lm_head if xlmr else model.cls)
  params = list(model.parameters())                  # tied weights appear once
  opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2]},
                           {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                          lr=spec["lr"], betas=(spec["b1"], spec["b2"]), eps=spec["eps"],
                          weight_decay=spec["weight_decay"])
  tau, lam = spec["tau"], spec["weight"]
  data = [{k: torch.from_numpy(np.asarray(v)).long() for k, v in b.items()} for b in batches]
  ce = torch.nn.functional.cross_entropy

  def step():
    b = data[step.i % len(data)]
    step.i += 1
    labels = b["mlm_labels"]
    if variant == "hf":
      out = model(input_ids=b["mlm_ids"], attention_mask=b["mlm_mask"], labels=labels,
                  output_hidden_states=True)
      mlm = out.loss
      with torch.no_grad():  # their MLM accuracy: argmax over every position's logits
        picked = labels != -100
        acc = (out.logits.argmax(-1)[picked] == labels[picked]).float().mean()
    else:
      hidden = base(input_ids=b["mlm_ids"], attention_mask=b["mlm_mask"]).last_hidden_state
      picked = labels != -100
      logits = head(hidden[picked])
      mlm = ce(logits, labels[picked])
      with torch.no_grad():
        acc = (logits.argmax(-1) == labels[picked]).float().mean()
    hx = base(input_ids=b["x_ids"], attention_mask=b["x_mask"]).last_hidden_state[:, 0]
    hy = base(input_ids=b["y_ids"], attention_mask=b["y_mask"]).last_hidden_state[:, 0]
    con = peer_infonce(hx, hy, tau)
    loss = mlm + lam * con
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if spec["clip"] > 0:
      torch.nn.utils.clip_grad_norm_(params, spec["clip"])
    opt.step()
    step.last = dict(loss=loss.item(), mlm_loss=mlm.item(), contrastive_loss=con.item(),
                     mlm_accuracy=acc.item())
    return step.last["loss"]

  step.i, step.last = 0, {}
  return step, model


class PeerWorker:
  """A peer in a child process: `worker()` runs one step there and returns its seconds."""

  reports_seconds = True

  def __init__(self, spec_path: str, inputs_path: str, variant: str, host_malloc: str,
               threads: int = 0):
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--spec", spec_path,
           "--inputs", inputs_path, "--variant", variant, "--host_malloc", host_malloc,
           "--threads", str(threads)]
    self.name = f"authors_{variant}/{host_malloc}" + (f"/{threads}thr" if threads else "")
    self.losses = []
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = self.proc.stdout.readline()
    if line.strip() != "ready":
      raise RuntimeError(f"{self.name}: worker failed to start (exit {self.proc.wait()})")

  def __call__(self) -> float:
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    seconds, loss = self.proc.stdout.readline().split()
    self.losses.append(float(loss))
    return float(seconds)

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def save_inputs(path: str, batches: list, state_dict: dict) -> None:
  arrays = {f"b{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}
  arrays.update({f"w/{k}": v for k, v in state_dict.items()})
  np.savez(path, **arrays)


def load_inputs(path: str) -> tuple[list, dict]:
  with np.load(path) as f:
    batches, weights = {}, {}
    for key in f.files:
      group, name = key.split("/", 1)
      if group == "w":
        weights[name] = f[key]
      else:
        batches.setdefault(int(group[1:]), {})[name] = f[key]
  return [batches[i] for i in sorted(batches)], weights


def _serve(argv=None):
  p = argparse.ArgumentParser(prog="bench/authors_peer.py --serve")
  p.add_argument("--serve", action="store_true", required=True)
  p.add_argument("--spec", required=True)
  p.add_argument("--inputs", required=True)
  p.add_argument("--variant", choices=VARIANTS, required=True)
  p.add_argument("--host_malloc", choices=MALLOC_SETTINGS, required=True)
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = default")
  args = p.parse_args(argv)
  from bepa_jax import host_memory
  host_memory.configure(args.host_malloc)  # before torch starts its threads
  with open(args.spec) as f:
    spec = json.load(f)
  batches, weights = load_inputs(args.inputs)
  step, _ = build_peer_step(spec, batches, args.variant, weights, args.threads or None)
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      break
    t0 = time.perf_counter()
    loss = step()
    print(time.perf_counter() - t0, loss, flush=True)


if __name__ == "__main__":
  _serve()
