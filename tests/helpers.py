"""Small shared helpers for tests: a tiny config and a job built on chosen devices."""
import jax

from bepa_jax.config import defaults as default_config


def tiny_config(**overrides):
  c = default_config.get_config()
  c.model.hidden_size = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.intermediate_size = 64
  c.model.hidden_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.data.max_length = 16
  c.data.max_predictions_per_seq = 3
  c.data.packing = False   # the padded layout; tests/test_packing.py checks the packed one
  c.tokenizer.vocab_size = 400
  c.train.global_batch = 16
  c.train.steps = 10
  c.train.log_every = 5
  c.optim.warmup_steps = 0
  c.optim.learning_rate = 1e-3
  c.optim.schedule = "constant"
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def devices(n):
  return jax.devices()[:n]


def assert_params_close(actual, desired, *, tight=1e-6, loose=2e-4, max_loose_fraction=1e-3):
  """Parameters equal up to float reordering, allowing for Adam's amplification of tiny grads.

  Sharded and unsharded runs sum gradients in different orders. Adam's update
  lr * m / (sqrt(v) + eps) turns rounding noise in a gradient that is ~0 (e.g. directions that
  a LayerNorm makes invariant) into a step of up to ~lr. So: every element within `loose`
  (0.2 x lr for lr 1e-3) and all but a tiny fraction within `tight`. A real disagreement (wrong
  shard, wrong sign, wrong labels) moves most elements by ~lr and fails both.
  """
  import numpy as np
  flat_a = jax.tree_util.tree_leaves_with_path(actual)
  flat_d = jax.tree.leaves(desired)
  assert len(flat_a) == len(flat_d)
  n_total = n_off = 0
  for (path, a), d in zip(flat_a, flat_d):
    a, d = np.asarray(a), np.asarray(d)
    assert a.shape == d.shape, jax.tree_util.keystr(path)
    diff = np.abs(a - d)
    assert diff.max() <= loose, f"{jax.tree_util.keystr(path)}: max diff {diff.max():.3g}"
    n_off += int((diff > tight).sum())
    n_total += a.size
  assert n_off <= max_loose_fraction * n_total, f"{n_off}/{n_total} elements differ by > {tight}"


def assert_gradcache_matches_end_to_end(job, step=1, chunks=2, seed=3):
  """GradCache's loss and gradient equal those of the same stochastic loss differentiated end
  to end (the chunks encoded with the same keys, their [CLS] merged, one contrastive loss)."""
  import jax.numpy as jnp
  import numpy as np

  from bepa_jax.trainer import loop
  from bepa_jax.objective import gradcache
  from bepa_jax.objective.loss import Objective
  obj, rng = Objective(job.model, job.config.loss, job.mesh), jax.random.key(seed)

  def end_to_end(p, batch):
    parts = gradcache.split(batch, chunks, job.mesh)
    outs = [obj.encode(p, jax.tree.map(lambda a: a[i], parts), jax.random.fold_in(rng, i))
            for i in range(chunks)]
    cls = gradcache.merge(jnp.stack([c for c, _ in outs]), job.mesh)
    ce, correct, count = (sum(m[j] for _, m in outs) for j in range(3))
    return obj.combine(ce, correct, count, obj.contrastive(p, cls, None, batch))

  with jax.set_mesh(job.mesh):
    batch = loop.global_batch(job.pipeline.batch(step), job.mesh)
    (l1, _), g1 = jax.jit(jax.value_and_grad(end_to_end, has_aux=True))(job.state.params, batch)
    (l2, _), g2 = jax.jit(lambda p, b: gradcache.value_and_grad(obj, p, b, rng, chunks,
                                                                job.mesh))(job.state.params, batch)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(g1)), jax.tree.leaves(jax.device_get(g2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
