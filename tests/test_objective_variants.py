"""Each InfoNCE variant (contrastive.py), sharded on 8 devices, against a hand-written loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from bepa_jax.config import validate as config_lib
from bepa_jax.training import step as step_lib
from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from bepa_jax.objective import heads, infonce as contrastive
from bepa_jax.objective.infonce import Options
from tests.helpers import devices, tiny_config


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _embeddings(B, D=12, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  zx = jax.random.normal(k[0], (B, D))
  zy = 0.6 * zx + jax.random.normal(k[1], (B, D))
  cx = zx + 0.3 * jax.random.normal(k[2], (B, D))   # "target side" embeddings, when distinct
  cy = zy + 0.3 * jax.random.normal(k[3], (B, D))
  return zx, zy, cx, cy


def _hashes(B):
  """Row 3's y text repeats row 5's, row 6's y text equals row 2's x text; the rest unique."""
  h = np.arange(2 * B, dtype=np.int32).reshape(B, 2) + 100
  h[3, 1] = h[5, 1]
  h[6, 1] = h[2, 0]
  return jnp.asarray(h)


def reference_loss(ax, ay, tau, opts, cx=None, cy=None, text_hash=None, shards=1):
  """Dense B x 2B logits, with the pool of each anchor decided by explicit loops over (i, j)."""
  norm = lambda z: z / jnp.linalg.norm(z, axis=1, keepdims=True)
  ax, ay = norm(ax), norm(ay)
  cx = ax if cx is None else norm(cx)
  cy = ay if cy is None else norm(cy)
  B = ax.shape[0]
  shard = np.arange(B) // (B // shards)
  hx = hy = None
  if text_hash is not None:
    hx, hy = np.asarray(text_hash[:, 0]), np.asarray(text_hash[:, 1])

  def pool(pos_hash, other_hash):
    """keep[i, j]: candidate j of anchor i is in its pool (j < B: other language, else same)."""
    keep = np.zeros((B, 2 * B), bool)
    for i in range(B):
      for j in range(B):
        if opts.negatives == "local" and shard[j] != shard[i]:
          continue
        keep[i, j] = j == i or pos_hash is None or pos_hash[j] != pos_hash[i]
        if opts.same_language:
          keep[i, B + j] = (not (j == i and opts.mask_self)
                            and (pos_hash is None or other_hash[j] != pos_hash[i]))
    return keep

  def sims(anchors, cands):  # gradient flows only through the anchor's own shard's columns
    live = anchors @ cands.T
    if opts.negatives != "global_stopgrad":
      return live
    frozen = anchors @ jax.lax.stop_gradient(cands).T
    return jnp.where(shard[:, None] == shard[None, :], live, frozen)

  def direction(anchors, pos_side, other_side, pos_hash, other_hash):
    s = jnp.concatenate([sims(anchors, pos_side), sims(anchors, other_side)], axis=1)
    s = s - opts.margin * np.eye(B, 2 * B)
    logits = s / tau
    keep = pool(pos_hash, other_hash)
    lse = jnp.log(jnp.sum(jnp.where(keep, jnp.exp(logits), 0.0), axis=1))
    return jnp.mean(lse - jnp.diagonal(logits[:, :B]))

  l_xy = direction(ax, cy, cx, hy, hx)
  l_yx = direction(ay, cx, cy, hx, hy)
  return {"mean": 0.5 * (l_xy + l_yx), "sum": l_xy + l_yx, "x2y": l_xy, "y2x": l_yx}[opts.symmetric]


VARIANTS = [
    Options(),
    Options(margin=0.3),
    Options(symmetric="sum"),
    Options(symmetric="x2y"),
    Options(symmetric="y2x", margin=0.2),
    Options(negatives="local"),
    Options(negatives="global_stopgrad"),
    Options(same_language=True),
    Options(same_language=True, mask_self=False),
    Options(mask_duplicates=True),
    Options(same_language=True, mask_duplicates=True, margin=0.1, negatives="global_stopgrad"),
    Options(same_language=True, mask_self=False, negatives="local", symmetric="x2y"),
]


CASES = [(o, False) for o in VARIANTS] + [(o, True) for o in VARIANTS[-3:]]


@pytest.mark.parametrize("opts, distinct_targets", CASES, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in vars(o).items() if v != getattr(Options(), k)) or "default"
    if isinstance(o, Options) else ("targets" if o else "self"))
def test_sharded_variant_matches_hand_written_reference(opts, distinct_targets):
  B, tau = 16, 0.1
  mesh = _mesh((4, 2, 1))
  zx, zy, cx, cy = _embeddings(B, seed=3)
  th = _hashes(B) if opts.mask_duplicates else None
  if not distinct_targets:
    cx = cy = None

  def sharded(*z):
    return contrastive.sharded_infonce(*z[:2], tau, mesh, opts, *z[2:], text_hash=th)[
        "contrastive_loss"]

  def ref(*z):
    return reference_loss(*z[:2], tau, opts, *z[2:], text_hash=th, shards=8)

  args = (zx, zy) if cx is None else (zx, zy, cx, cy)
  argnums = tuple(range(len(args)))
  with jax.set_mesh(mesh):
    v1, g1 = jax.jit(jax.value_and_grad(sharded, argnums=argnums))(*args)
  v2, g2 = jax.value_and_grad(ref, argnums=argnums)(*args)
  assert float(v2) > 0.01
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


CHUNKED = [Options(chunk=4), Options(chunk=8, symmetric="sum"), Options(chunk=4, symmetric="y2x"),
           Options(chunk=2, negatives="local"), Options(chunk=8, negatives="global_stopgrad")]


@pytest.mark.parametrize("opts", CHUNKED, ids=lambda o: ",".join(
    f"{k}={v}" for k, v in vars(o).items() if v != getattr(Options(), k)))
@pytest.mark.parametrize("distinct_targets", [False, True], ids=["self", "targets"])
def test_chunked_form_matches_the_hand_written_reference(opts, distinct_targets):
  """The streaming log-sum-exp is the same loss for every option it accepts, with distinct
  candidates (predictor / EMA target) too; value and gradient against reference_loss."""
  B, tau = 16, 0.1
  mesh = _mesh((4, 2, 1))
  zx, zy, cx, cy = _embeddings(B, seed=11)
  args = (zx, zy, cx, cy) if distinct_targets else (zx, zy)
  argnums = tuple(range(len(args)))
  sharded = lambda *z: contrastive.sharded_infonce(*z[:2], tau, mesh, opts, *z[2:])[
      "contrastive_loss"]
  with jax.set_mesh(mesh):
    v1, g1 = jax.jit(jax.value_and_grad(sharded, argnums=argnums))(*args)
  v2, g2 = jax.value_and_grad(lambda *z: reference_loss(*z[:2], tau, opts, *z[2:], shards=8),
                              argnums=argnums)(*args)
  assert float(v2) > 0.01
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides, fragment", [
    ({"loss.margin": 0.2}, "loss.margin"),
    ({"loss.same_language_negatives": True}, "loss.same_language_negatives"),
    ({"loss.mask_duplicates": True}, "loss.mask_duplicates"),
    ({"loss.learn_temperature": True}, "loss.learn_temperature"),
    ({"train.global_batch": 24}, "must divide the 24 candidates"),
    ({"loss.negatives": "local"}, "must divide the 2 candidates"),
])
def test_chunked_combinations_it_cannot_compute_are_refused_in_one_line(overrides, fragment):
  """Refused by config.validate, before anything is built, not silently ignored."""
  cfg = tiny_config(**{"loss.contrastive_chunk": 16, **overrides})
  with pytest.raises(config_lib.ConfigError, match=fragment.replace(".", r"\.")) as e:
    config_lib.validate(cfg, 8)
  assert "\n" not in str(e.value) and "loss.contrastive_chunk=16" in str(e.value)


def test_stopgrad_negatives_same_value_smaller_gradient():
  """global_stopgrad: the pool and loss are global; the gradient skips gathered columns."""
  B, tau = 16, 0.1
  mesh = _mesh((8, 1, 1))
  zx, zy, _, _ = _embeddings(B, seed=5)
  run = lambda opts: jax.jit(jax.value_and_grad(
      lambda a, b: contrastive.sharded_infonce(a, b, tau, mesh, opts)["contrastive_loss"],
      argnums=(0, 1)))(zx, zy)
  with jax.set_mesh(mesh):
    (v_g, g_g), (v_s, g_s), (v_l, _) = (run(Options(negatives=n))
                                        for n in ("global", "global_stopgrad", "local"))
  np.testing.assert_allclose(v_s, v_g, rtol=1e-6)
  assert float(v_l) < float(v_g) - 0.5  # 2-row pools are far easier than 16-row ones
  assert np.abs(np.asarray(g_s[0]) - np.asarray(g_g[0])).max() > 1e-3


def test_unmasked_self_adds_the_constant_self_term():
  """mask_self=False with same-language negatives: each denominator gains e^{1/tau}."""
  zx = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  zy = jnp.array([[1.0, 0.1], [0.2, 1.0], [-1.0, 1.0]])
  tau = 0.5
  nx, ny = (np.asarray(z) / np.linalg.norm(z, axis=1, keepdims=True) for z in (zx, zy))
  sxy, sxx, syy = nx @ ny.T / tau, nx @ nx.T / tau, ny @ ny.T / tau
  def direction(cross, same):  # rows: anchors; cross: vs the other language; same: own language
    return np.mean(np.log(np.exp(cross).sum(1) + np.exp(same).sum(1)) - np.diag(cross))
  expected = 0.5 * (direction(sxy, sxx) + direction(sxy.T, syy))
  out = contrastive.infonce_reference(zx, zy, tau, Options(same_language=True, mask_self=False))
  np.testing.assert_allclose(out["contrastive_loss"], expected, rtol=1e-6)
  assert np.allclose(np.diag(sxx), 1 / tau)  # the self term is the constant e^{1/tau}
  masked = contrastive.infonce_reference(zx, zy, tau, Options(same_language=True))
  def direction_masked(cross, same):
    same = np.where(np.eye(3, dtype=bool), -np.inf, same)
    return np.mean(np.log(np.exp(cross).sum(1) + np.exp(same).sum(1)) - np.diag(cross))
  np.testing.assert_allclose(masked["contrastive_loss"],
                             0.5 * (direction_masked(sxy, sxx) + direction_masked(sxy.T, syy)),
                             rtol=1e-6)


def test_duplicate_text_is_masked_and_absent_hash_is_a_no_op():
  B, tau = 8, 0.1
  zx, zy, _, _ = _embeddings(B, seed=2)
  zy = zy.at[5].set(zy[3])  # rows 3 and 5 carry the same y sentence
  th = np.arange(2 * B, dtype=np.int32).reshape(B, 2)
  th[5, 1] = th[3, 1]
  opts = Options(mask_duplicates=True)
  masked = contrastive.infonce_reference(zx, zy, tau, opts, text_hash=jnp.asarray(th))
  plain = contrastive.infonce_reference(zx, zy, tau, Options())
  no_hash = contrastive.infonce_reference(zx, zy, tau, opts)
  np.testing.assert_allclose(no_hash["contrastive_loss"], plain["contrastive_loss"], rtol=1e-7)
  # by hand: x->y anchors 3 and 5 lose each other's y (same text as their positive); y->x
  # is unchanged (its positives are the x texts, all distinct)
  nx, ny = (np.asarray(z) / np.linalg.norm(z, axis=1, keepdims=True) for z in (zx, zy))
  s = nx @ ny.T / tau
  keep = np.ones((B, B), bool)
  keep[3, 5] = keep[5, 3] = False
  lxy = np.mean(np.log(np.where(keep, np.exp(s), 0).sum(1)) - np.diag(s))
  lyx = np.mean(np.log(np.exp(s).sum(0)) - np.diag(s))
  np.testing.assert_allclose(masked["contrastive_loss"], 0.5 * (lxy + lyx), rtol=1e-6)
  assert float(masked["contrastive_loss"]) < float(plain["contrastive_loss"])


def test_learned_temperature_gradient_matches_reference():
  B = 16
  mesh = _mesh((2, 4, 1))
  zx, zy, _, _ = _embeddings(B, seed=7)
  opts = Options(margin=0.2, same_language=True)
  f = lambda t: contrastive.sharded_infonce(zx, zy, t, mesh, opts)["contrastive_loss"]
  with jax.set_mesh(mesh):
    v1, g1 = jax.jit(jax.value_and_grad(f))(jnp.float32(0.05))
  v2, g2 = jax.value_and_grad(lambda t: reference_loss(zx, zy, t, opts))(jnp.float32(0.05))
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(g1, g2, rtol=1e-4)
  assert abs(float(g2)) > 1.0


def test_temperature_is_log_parameterised_and_clamped():
  cfg = tiny_config(**{"loss.learn_temperature": True, "loss.temperature": 0.05,
                       "loss.temperature_min": 0.02, "loss.temperature_max": 0.5}).loss
  head = heads.from_config(cfg, 32)
  p = heads.init_params(head, jax.random.key(0), 32)
  np.testing.assert_allclose(p["log_temperature"], np.log(0.05), rtol=1e-6)
  np.testing.assert_allclose(heads.temperature(head, p, cfg), 0.05, rtol=1e-6)
  assert float(heads.temperature(head, {"log_temperature": jnp.log(1e-4)}, cfg)) == pytest.approx(0.02)
  assert float(heads.temperature(head, {"log_temperature": jnp.log(9.0)}, cfg)) == pytest.approx(0.5)


@pytest.mark.parametrize("overrides, fragment", [
    ({"loss.symmetric": "both"}, "loss.symmetric"),
    ({"loss.negatives": "remote"}, "loss.negatives"),
    ({"loss.margin": -0.1}, "loss.margin"),
    ({"loss.ema_decay": 1.0}, "loss.ema_decay"),
    ({"loss.learn_temperature": True, "loss.temperature": 2.0}, "loss.temperature"),
    ({"loss.projector_layers": -1}, "loss.projector_layers"),
    ({"train.gradcache_chunks": 3}, "train.gradcache_chunks"),
    ({"train.gradcache_chunks": 2, "train.grad_accum_steps": 2}, "train.gradcache_chunks"),
])
def test_config_errors_name_the_key(overrides, fragment):
  with pytest.raises(config_lib.ConfigError, match=fragment.replace(".", r"\.")) as e:
    config_lib.validate(tiny_config(**overrides), 8)
  assert "\n" not in str(e.value)


def test_heads_and_ema_target_enter_the_loss_as_documented():
  """Anchors = predictor(projector([CLS])); candidates = EMA target's projector([CLS])."""
  B, H = 16, 32
  cfg = tiny_config(**{"loss.projector_layers": 2, "loss.projector_dim": 24,
                       "loss.predictor_layers": 1, "loss.learn_temperature": True,
                       "loss.margin": 0.2, "loss.same_language_negatives": True,
                       "loss.ema_decay": 0.9})
  head = heads.from_config(cfg.loss, H)
  hp = heads.init_params(head, jax.random.key(1), H)
  cls = jax.random.normal(jax.random.key(2), (B, 2, H))
  target = jax.random.normal(jax.random.key(3), (B, 2, 24))
  mesh = _mesh((8, 1, 1))
  obj = step_lib.Objective(None, cfg.loss, mesh, head)
  params = {"encoder": {}, heads.HEAD_KEY: hp}
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, c, t: obj.contrastive(p, c, t, {}))(params, cls, target)
  proj = lambda z: head.apply({"params": hp}, z, method=heads.ContrastiveHead.project)
  pred = lambda z: head.apply({"params": hp}, z, method=heads.ContrastiveHead.predict)
  ax, ay = pred(proj(cls[:, 0])), pred(proj(cls[:, 1]))
  assert ax.shape == (B, 24)
  expected = reference_loss(ax, ay, 0.07, Options(margin=0.2, same_language=True),
                            target[:, 0], target[:, 1])
  np.testing.assert_allclose(out["contrastive_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(out["temperature"], 0.07, rtol=1e-6)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("variants"))


def test_train_step_optimises_temperature_and_heads_and_updates_ema(workdir):
  cfg = tiny_config(**{"loss.projector_layers": 1, "loss.predictor_layers": 2,
                       "loss.learn_temperature": True, "loss.ema_decay": 0.9,
                       "loss.same_language_negatives": True, "loss.mask_duplicates": True})
  job = build_lib.build(cfg, workdir, devices(8))
  state0 = jax.device_get(job.state)
  hp0 = state0.params[heads.HEAD_KEY]
  assert set(hp0) == {"proj", "pred", "log_temperature"}
  assert set(state0.ema_params) == set(state0.params)              # encoder parts + projector
  assert set(state0.ema_params[heads.HEAD_KEY]) == {"proj"}
  batch = job.pipeline.batch(0)
  assert batch["text_hash"].shape == (16, 2)
  with jax.set_mesh(job.mesh):
    state1, metrics = job.step_fn(job.state, loop.global_batch(batch, job.mesh))
  state1 = jax.device_get(state1)
  hp1 = state1.params[heads.HEAD_KEY]
  assert float(metrics["temperature"]) == pytest.approx(0.07, rel=1e-5)
  assert abs(float(hp1["log_temperature"] - hp0["log_temperature"])) > 1e-4   # optimised
  for name in ("proj", "pred"):
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(hp1[name]),
                                                 jax.tree.leaves(hp0[name]))]
    assert max(moved) > 1e-5, name
  expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state0.ema_params,
                          heads.ema_target(state1.params))
  for a, b in zip(jax.tree.leaves(state1.ema_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert np.isfinite(float(metrics["loss"]))


def test_lambda_zero_with_variants_is_pure_mlm(workdir):
  cfg = tiny_config(**{"loss.weight": 0.0, "loss.projector_layers": 1, "loss.margin": 0.3,
                       "loss.negatives": "local"})
  job = build_lib.build(cfg, workdir, devices(8))
  with jax.set_mesh(job.mesh):
    _, m = job.step_fn(job.state, loop.global_batch(job.pipeline.batch(0), job.mesh))
  assert float(m["loss"]) == pytest.approx(float(m["mlm_loss"]), rel=1e-7)
  assert float(m["contrastive_loss"]) > 0
