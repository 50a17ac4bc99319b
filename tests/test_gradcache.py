"""GradCache gives the full-batch gradient; gradient accumulation does not enlarge the pool."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from bepa_jax.objective import gradcache, heads, infonce as contrastive
from bepa_jax import mesh as mesh_lib
from bepa_jax.training import step as step_lib
from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from tests.helpers import devices, tiny_config

B = 16


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("gradcache"))


def _setup(workdir, **overrides):
  cfg = tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2, **overrides})
  job = build_lib.build(cfg, workdir, devices(8))
  head = heads.from_config(cfg.loss, job.model_cfg.hidden_size)
  obj = step_lib.Objective(job.model, cfg.loss, job.mesh, head)
  batch = loop.global_batch(job.pipeline.batch(0), job.mesh)
  return cfg, job, obj, batch


def _run(job, cfg, fn, *args):
  with jax.set_mesh(job.mesh), nn.logical_axis_rules(mesh_lib.rules(cfg.mesh)):
    return jax.device_get(jax.jit(fn)(*args))


def _assert_trees_close(a, b, rtol=1e-5, atol=None):
  """Leaf by leaf; atol None = rtol x the leaf's largest entry (entries that are sums with
  cancellation, e.g. the [CLS] position embedding, are only exact to the leaf's scale), and at
  least 1e-7 x the largest gradient entry. Attention key biases have an exactly-zero gradient
  (softmax is invariant to them): both must be zero to rounding, 1e-6 x the largest entry."""
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  top = max(float(np.abs(y).max()) for y in jax.tree.leaves(b))
  floor = 1e-7 * top
  for (path, x), y in zip(flat_a, jax.tree.leaves(b)):
    name = jax.tree_util.keystr(path)
    if name.endswith("['key']['bias']"):  # softmax ignores it: zero in both, up to rounding
      assert max(np.abs(x).max(), np.abs(y).max()) <= 1e-6 * top, name
      continue
    tol = max(rtol * float(np.abs(y).max()), floor) if atol is None else atol
    np.testing.assert_allclose(x, y, rtol=rtol, atol=tol, err_msg=jax.tree_util.keystr(path))


# A wider init than BERT's 0.02 spreads the tiny model's [CLS] apart, so the contrastive
# gradient is well conditioned and not swamped by the MLM one.
WIDE = {"model.initializer_range": 0.3}


@pytest.mark.parametrize("overrides", [
    WIDE,
    # (at init 0.02 the projected embeddings here are identical to ~1e-7 and the head
    # gradients ill-conditioned: a 1e-7 change of the params moves them by ~1%)
    {"loss.projector_layers": 1, "loss.predictor_layers": 1, "loss.learn_temperature": True,
     "loss.same_language_negatives": True, "loss.margin": 0.2, "loss.ema_decay": 0.99,
     **WIDE},
], ids=["default", "heads+ema+variants"])
def test_gradcache_gradient_equals_full_batch_gradient(workdir, overrides):
  cfg, job, obj, batch = _setup(workdir, **overrides)
  params, ema = job.state.params, job.state.ema_params
  rng = jax.random.key(0)
  full = _run(job, cfg, lambda p, b: jax.value_and_grad(obj.loss_fn, has_aux=True)(p, b, rng, ema),
              params, batch)
  chunked = _run(job, cfg, lambda p, b: gradcache.value_and_grad(obj, p, b, rng, 2, job.mesh, ema),
                 params, batch)
  (loss_f, m_f), g_f = full
  (loss_c, m_c), g_c = chunked
  assert m_f["contrastive_loss"] > 1.0
  np.testing.assert_allclose(loss_c, loss_f, rtol=1e-5)
  for k in m_f:  # not top-1 accuracies: near-ties at init flip on rounding-level changes
    if not k.startswith("acc_"):
      np.testing.assert_allclose(m_c[k], m_f[k], rtol=1e-5, atol=1e-7, err_msg=k)
  _assert_trees_close(g_c, g_f, rtol=1e-5)


def test_train_step_with_gradcache_matches_plain_step(workdir):
  """The jitted step with train.gradcache_chunks=2 makes the same update as the plain step."""
  out = []
  for chunks in (0, 2):
    cfg = tiny_config(**{"train.gradcache_chunks": chunks})
    job = build_lib.build(cfg, workdir, devices(8))
    with jax.set_mesh(job.mesh):
      state, m = job.step_fn(job.state, loop.global_batch(job.pipeline.batch(0), job.mesh))
    out.append((jax.device_get(state.params), jax.device_get(m)))
  (p0, m0), (p1, m1) = out
  for k in ("loss", "contrastive_loss", "mlm_loss", "grad_norm"):
    np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, err_msg=k)
  # After one AdamW step (update ~ lr * g / (|g| + eps), lr = 1e-3): rounding-level changes of
  # near-zero gradient entries move a few updates by up to ~1e-4; a wrong gradient moves ~1e-3.
  _assert_trees_close(p1, p0, rtol=0, atol=1e-4)


def test_gradient_accumulation_does_not_enlarge_the_pool(workdir):
  """k=2 accumulation = mean over two pools of B/2 rows, not one pool of B rows."""
  cfg, job, obj, batch = _setup(workdir, **WIDE)
  k, rng, params = 2, jax.random.key(0), job.state.params
  grad_fn = jax.value_and_grad(obj.loss_fn, has_aux=True)
  (_, m_acc), g_acc = _run(job, cfg, lambda p, b: step_lib.accumulate(grad_fn, p, b, rng, k,
                                                                      job.mesh), params, batch)
  (_, m_full), g_full = _run(job, cfg, lambda p, b: grad_fn(p, b, rng), params, batch)

  # The pools by hand: micro-batch i holds rows i, i+k, ... (spread over every device).
  # Dropout is off, so [CLS] does not depend on which pass computed it.
  cls, _ = _run(job, cfg, lambda p, b: obj.encode(p, b, rng), params, batch)
  pool_losses = [float(contrastive.infonce_reference(
      cls[i::k, 0], cls[i::k, 1], 0.07, contrastive.Options())["contrastive_loss"])
      for i in range(k)]
  full_pool = float(contrastive.infonce_reference(
      cls[:, 0], cls[:, 1], 0.07, contrastive.Options())["contrastive_loss"])
  np.testing.assert_allclose(m_acc["contrastive_loss"], np.mean(pool_losses), rtol=1e-5)
  np.testing.assert_allclose(m_full["contrastive_loss"], full_pool, rtol=1e-5)
  # At init the loss is near log(pool size): the pools differ by ~log k.
  assert m_full["contrastive_loss"] - m_acc["contrastive_loss"] > 0.5 * np.log(k)

  # Gradient: the mean of the micro-batches' own gradients, and not the full-batch one. Each
  # micro-batch's MLM CE sum is divided by the whole batch's masked count / k (one MLM loss).
  host = jax.device_get(batch)
  norm = float(host["mlm_weights"].sum()) / k
  per_micro = []
  for i in range(k):
    mb = loop.global_batch({key: v[i::k] for key, v in host.items()}, job.mesh)
    per_micro.append(_run(job, cfg, lambda p, b, i=i: grad_fn(p, b, jax.random.fold_in(rng, i),
                                                              None, norm), params, mb)[1])
  mean_g = jax.tree.map(lambda *g: sum(g) / k, *per_micro)
  _assert_trees_close(g_acc, mean_g, rtol=1e-5)
  max_diff = lambda a, b: max(float(np.abs(x - y).max())
                              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  noise = max_diff(g_acc, mean_g)  # rounding level of the comparison just made
  assert max_diff(g_acc, g_full) > 100 * max(noise, 1e-9)


def test_mlm_loss_has_one_definition_plain_accumulated_and_gradcache(workdir):
  """Pure MLM (loss.weight=0): the plain step, k=2 accumulation and GradCache k=2 give the same
  loss and gradient: CE summed over the step's masked positions / their global count, even
  when the micro-batches hold different numbers of masked positions."""
  cfg, job, obj, batch = _setup(workdir, **{"loss.weight": 0.0})
  k, rng, params = 2, jax.random.key(0), job.state.params
  host = {key: np.array(v) for key, v in jax.device_get(batch).items()}
  host["mlm_weights"][0:4:k] = 0.0  # micro-batch 0 (rows 0, k, ...) loses two rows' targets
  batch = loop.global_batch(host, job.mesh)
  counts = [float(host["mlm_weights"][i::k].sum()) for i in range(k)]
  assert counts[0] < counts[1], counts  # else averaging micro-batch means would agree too
  grad_fn = jax.value_and_grad(obj.loss_fn, has_aux=True)
  (_, m_plain), g_plain = _run(job, cfg, lambda p, b: grad_fn(p, b, rng), params, batch)
  (_, m_acc), g_acc = _run(job, cfg, lambda p, b: step_lib.accumulate(grad_fn, p, b, rng, k,
                                                                      job.mesh), params, batch)
  (_, m_gc), g_gc = _run(job, cfg, lambda p, b: gradcache.value_and_grad(obj, p, b, rng, k,
                                                                         job.mesh), params, batch)
  for m in (m_acc, m_gc):
    for key in ("loss", "mlm_loss", "mlm_accuracy"):
      np.testing.assert_allclose(m[key], m_plain[key], rtol=1e-5, err_msg=key)
  _assert_trees_close(g_acc, g_plain, rtol=1e-5)
  _assert_trees_close(g_gc, g_plain, rtol=1e-5)
  # The old accumulation (mean of the micro-batches' own MLM means) is a different number.
  means = [float(_run(job, cfg, lambda p, b: grad_fn(p, b, rng)[0][1]["mlm_loss"], params,
                      loop.global_batch({key: v[i::k] for key, v in host.items()}, job.mesh)))
           for i in range(k)]
  assert abs(np.mean(means) - float(m_plain["mlm_loss"])) > 1e-4


def test_objective_implements_the_interface_gradcache_declares(workdir):
  cfg, job, obj, _ = _setup(workdir)
  assert isinstance(obj, gradcache.SplitLoss)
  assert not isinstance(object(), gradcache.SplitLoss)
