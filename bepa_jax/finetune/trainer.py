"""Fine-tuning and evaluation of a task head on the encoder, sharded like pretraining.

The batch is split over the mesh's batch axes (data x fsdp) and parameters keep the logical
shardings of model.py (config.mesh.rules), so a model that pretrained on a pod fine-tunes
there. Every process builds the same global batch on the host and hands over only its rows.
"""
from __future__ import annotations

import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bepa_jax import model as model_lib
from bepa_jax import mesh as mesh_lib
from bepa_jax.training import state as train_state
from bepa_jax.errors import InputError
from bepa_jax.finetune import features, metrics, report
from bepa_jax.model import BepaEncoder, EncoderConfig, normal_init, zeros_init

log = logging.getLogger("bepa.transfer")
# The pretrained encoder minus its MLM head, which no task uses.
ENCODER_KEYS = tuple(k for k in model_lib.ENCODER_KEYS if k != "mlm_head")


class TaskHead(nn.Module):
  """classification: dropout -> dense+tanh on [CLS] -> dropout -> C logits (RoBERTa's head);
  regression: the same head with one output (HF's num_labels=1); span: one dense layer on
  every token -> (start, end) logits."""
  cfg: EncoderConfig
  kind: str
  num_labels: int

  @nn.compact
  def __call__(self, hidden, deterministic: bool):
    cfg = self.cfg
    drop = nn.Dropout(cfg.hidden_dropout)
    if self.kind == "span":
      return nn.Dense(2, kernel_init=normal_init(cfg, ("embed", None)),
                      bias_init=zeros_init((None,)), name="span")(hidden.astype(jnp.float32))
    x = drop(hidden[:, 0].astype(jnp.float32), deterministic=deterministic)
    x = jnp.tanh(nn.Dense(cfg.hidden_size, kernel_init=normal_init(cfg, ("embed", "mlp")),
                          bias_init=zeros_init(("mlp",)), name="dense")(x))
    x = drop(x, deterministic=deterministic)
    return nn.Dense(self.num_labels, kernel_init=normal_init(cfg, ("mlp", None)),
                    bias_init=zeros_init((None,)), name="out")(x)


class TaskModel(BepaEncoder):
  """BepaEncoder (same parameter names) + `task_head`."""
  kind: str = "classification"
  num_labels: int = 2

  def setup(self):
    super().setup()
    self.task_head = TaskHead(self.cfg, self.kind, self.num_labels)

  def task_logits(self, input_ids, token_type_ids, attention_mask, deterministic: bool = True):
    out = self(input_ids, token_type_ids, attention_mask, None, deterministic)
    return self.task_head(out["hidden"], deterministic)


def _apply(model, params, batch, deterministic, rng=None):
  return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                     batch["attention_mask"], deterministic, method=TaskModel.task_logits,
                     rngs=None if rng is None else {"dropout": rng})


def loss_fn(model, params, batch, rng):
  """Mean cross-entropy (regression: squared error of the one output) over the real rows
  (weight 1; padding rows of a last batch weigh 0)."""
  logits = _apply(model, params, batch, False, rng)
  w = batch["weight"].astype(jnp.float32)
  if model.kind == "span":
    valid = batch["attention_mask"].astype(bool)
    logits = jnp.where(valid[..., None], logits, -1e9)
    ce = sum(optax.softmax_cross_entropy_with_integer_labels(logits[..., k], batch[key])
             for k, key in ((0, "start_positions"), (1, "end_positions"))) / 2
  elif model.kind == "regression":
    ce = jnp.square(logits[:, 0] - batch["labels"].astype(jnp.float32))
  else:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
  return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


def create_state(model, tx, encoder_params, mesh, mesh_cfg, max_length: int, seed: int = 0):
  """TrainState with the head freshly initialised and the encoder's pretrained params,
  all placed in their logical shardings."""
  ex = np.zeros((1, max_length), np.int32)
  def init(rng):
    params = model.init(rng, ex, ex, ex + 1, method=TaskModel.task_logits)["params"]
    return train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params), tx=tx)
  rng = jax.random.key(seed)
  boxed = jax.eval_shape(init, rng)
  shardings = nn.meta.unbox(mesh_lib.logical_shardings(boxed, mesh, mesh_cfg))
  shardings = shardings.replace(step=mesh_lib.replicated(mesh))
  missing = [k for k in ENCODER_KEYS if k not in encoder_params]
  if missing:
    raise InputError(f"pretrained params lack {missing} (not a BepaEncoder checkpoint?)")
  pretrained = {k: encoder_params[k] for k in ENCODER_KEYS}

  def init_with(rng, pre):  # the optimizer state of Adam does not depend on param values
    state = nn.meta.unbox(init(rng))
    params = {**state.params, **pre}
    return state.replace(params=params, opt_state=tx.init(params))
  pre_shardings = {k: shardings.params[k] for k in ENCODER_KEYS}
  pretrained = jax.tree.map(lambda p, s: jax.device_put(np.asarray(p), s)
                            if not isinstance(p, jax.Array) else jax.device_put(p, s),
                            pretrained, pre_shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.rules(mesh_cfg)):
    state = jax.jit(init_with, out_shardings=shardings)(rng, pretrained)
  return state, shardings


class Runner:
  """Jitted, sharded `train_step(state, batch)` and `predict(params, batch)` for one task."""

  def __init__(self, model: TaskModel, mesh, mesh_cfg, state_shardings, seed: int = 0):
    self.model, self.mesh = model, mesh
    rules = mesh_lib.rules(mesh_cfg)
    bs = mesh_lib.batch_sharding(mesh)
    self.shards = int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))
    self._bs = bs

    def step(state, batch):
      with nn.logical_axis_rules(rules):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, batch, rng))(state.params)
        return state.apply_gradients(grads), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def predict(params, batch):
      with nn.logical_axis_rules(rules):
        return _apply(model, params, batch, True)

    self.train_step = jax.jit(step, in_shardings=(state_shardings, bs),
                              out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                              donate_argnums=(0,))
    self.predict = jax.jit(predict, in_shardings=(state_shardings.params, bs),
                           out_shardings=mesh_lib.replicated(mesh))

  def put(self, batch: dict) -> dict:
    return {k: jax.make_array_from_callback(v.shape, self._bs, lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def _check_labels(task, labels: np.ndarray):
  if task.kind == "regression":
    bad = labels[~np.isfinite(labels)]
    if bad.size:
      raise InputError(f"{task.name}: label {bad[0]} is not a finite number")
    return
  bad = labels[(labels < 0) | (labels >= task.num_labels)]
  if bad.size:
    raise InputError(f"{task.name}: label {int(bad[0])} outside 0..{task.num_labels - 1} "
                     f"(set --num-labels?)")


def _label_dtype(task):
  return np.float32 if task.kind == "regression" else np.int32


def _take(arrays: dict, idx, keys) -> dict:
  return {k: arrays[k][idx] for k in keys}


def _pad_rows(batch: dict, n: int) -> dict:
  """Pads every array to n rows (zeros) and adds `weight` (1 for real rows)."""
  real = len(next(iter(batch.values())))
  out = {k: np.concatenate([v, np.zeros((n - real,) + v.shape[1:], v.dtype)])
         for k, v in batch.items()}
  out["weight"] = (np.arange(n) < real).astype(np.float32)
  return out


def train_batches(task, records, tok, family, max_length, batch_size, steps, seed,
                  doc_stride=128):
  """Yields `steps` batches of features from shuffled records (epochs repeat as needed)."""
  rng = np.random.default_rng(seed)
  label_keys = ("start_positions", "end_positions") if task.kind == "span" else ("labels",)
  buf = {k: np.zeros((0, max_length) if k in features.KEYS else (0,),
                     _label_dtype(task) if k == "labels" else np.int32)
         for k in features.KEYS + label_keys}
  order, pos, done = rng.permutation(len(records)), 0, 0
  chunk = max(batch_size, 256)
  while done < steps:
    while len(buf["input_ids"]) < batch_size:
      if pos >= len(order):
        order, pos = rng.permutation(len(records)), 0
      recs = [records[int(i)] for i in order[pos:pos + chunk]]
      pos += chunk
      if task.kind == "span":
        feats, _ = features.span_features(recs, tok, family, max_length, doc_stride)
      else:
        feats = features.classification_features(recs, tok, family, max_length,
                                                 _label_dtype(task))
        _check_labels(task, feats["labels"])
      buf = {k: np.concatenate([buf[k], feats[k]]) for k in buf}
    yield {k: v[:batch_size] for k, v in buf.items()}, None
    buf = {k: v[batch_size:] for k, v in buf.items()}
    done += 1


def finetune(runner: Runner, state, task, records, tok, family, max_length, batch_size, steps,
             seed=0, log_every=50, doc_stride=128):
  """Runs `steps` sharded steps; returns (state, losses per step)."""
  losses, t0 = [], time.time()
  with jax.set_mesh(runner.mesh):
    for i, (batch, _) in enumerate(train_batches(task, records, tok, family, max_length,
                                                 batch_size, steps, seed, doc_stride)):
      batch = _pad_rows(batch, batch_size)
      state, m = runner.train_step(state, runner.put(batch))
      losses.append(float(m["loss"]))
      if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
        log.info("step %d/%d loss %.4f (%.1f steps/s)", i + 1, steps, losses[-1],
                 (i + 1) / (time.time() - t0))
  return state, losses


def _predict_all(runner, params, arrays, keys, batch_size) -> np.ndarray:
  n = len(arrays["input_ids"])
  outs = []
  with jax.set_mesh(runner.mesh):
    for s in range(0, n, batch_size):
      b = _pad_rows(_take(arrays, slice(s, s + batch_size), keys), batch_size)
      b.pop("weight")
      outs.append(np.asarray(runner.predict(params, runner.put(b)))[:min(batch_size, n - s)])
  return np.concatenate(outs) if outs else np.zeros((0,))


def evaluate(runner, params, task, records, tok, family, max_length, batch_size,
             doc_stride=128, score_lang=None) -> dict:
  """The task's official metrics of one evaluation set: EM / F1 (span, scored in
  `score_lang`), or metrics.classification_scores(task.metric_set) of the predictions."""
  if task.kind == "span":
    arrays, windows = features.span_features(records, tok, family, max_length, doc_stride)
    logits = _predict_all(runner, params, arrays, features.KEYS, batch_size)
    preds = features.best_spans(logits[..., 0], logits[..., 1], windows, arrays["example"],
                                records)
    return metrics.span_scores(preds, [r["answers"] for r in records], score_lang)
  arrays = features.classification_features(records, tok, family, max_length,
                                            _label_dtype(task))
  _check_labels(task, arrays["labels"])
  logits = _predict_all(runner, params, arrays, features.KEYS, batch_size)
  preds = logits[:, 0] if task.kind == "regression" else logits.argmax(-1)
  return metrics.classification_scores(task.metric_set, preds, arrays["labels"])


def fit_batch(batch_size: int, shards: int) -> int:
  return -(-max(int(batch_size), 1) // shards) * shards


def make_optimizer(lr: float, steps: int, warmup_fraction: float = 0.1,
                   weight_decay: float = 0.01):
  """AdamW through train_state.create_optimizer: linear warmup then linear decay to 0."""
  from bepa_jax.config import defaults as default_config
  optim = default_config.get_config().optim
  optim.learning_rate, optim.schedule, optim.end_lr_fraction = float(lr), "linear", 0.0
  optim.warmup_steps = int(warmup_fraction * steps)
  optim.weight_decay, optim.grad_clip_norm = float(weight_decay), 1.0
  return train_state.create_optimizer(optim, steps)


def run(task, loaded, mesh, mesh_cfg, *, steps: int, batch_size: int = 32, lr: float = 3e-5,
        max_length: int = 128, max_eval: int = 0, seed: int = 0, doc_stride: int = 128,
        log_every: int = 50) -> dict:
  """Fine-tunes on the task's English training data, evaluates every evaluation set.

  -> the report of finetune.report.build: results per evaluation set, averages, train.
  """
  cfg, tok = loaded.model_cfg, loaded.tokenizer
  # Open every data set first: a missing one fails now, not after hours of fine-tuning.
  train_records = task.train()
  eval_sets = {lang: open_() for lang, open_ in task.evals.items()}
  model = TaskModel(cfg, kind=task.kind, num_labels=task.num_labels)
  tx = make_optimizer(lr, steps)
  state, shardings = create_state(model, tx, loaded.params, mesh, mesh_cfg, max_length, seed)
  runner = Runner(model, mesh, mesh_cfg, shardings, seed)
  batch_size = fit_batch(batch_size, runner.shards)
  t0 = time.time()
  log.info("%s: fine-tuning %d steps of %d on %d training records", task.name, steps,
           batch_size, len(train_records))
  state, losses = finetune(runner, state, task, train_records, tok, cfg.family, max_length,
                           batch_size, steps, seed, log_every, doc_stride)
  train_s = time.time() - t0
  results = {}
  for key, recs in eval_sets.items():
    n = len(recs) if not max_eval else min(max_eval, len(recs))
    recs = [recs[i] for i in range(n)]
    results[key] = evaluate(runner, state.params, task, recs, tok, cfg.family, max_length,
                            batch_size, doc_stride, task.score_langs.get(key))
    log.info("%s %s: %s", task.name, key, results[key])
  return report.build(task, results, {
      "steps": steps, "batch_size": batch_size, "learning_rate": lr, "max_length": max_length,
      "losses": losses, "seconds": train_s})
