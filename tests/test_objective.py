"""The sharded InfoNCE equals the plain global one, in value and in gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from bepa_jax.objective import infonce as objective, mlm


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _embeddings(B, D=24, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  zx = jax.random.normal(kx, (B, D))
  zy = 0.6 * zx + jax.random.normal(ky, (B, D))  # related but far from perfect: loss > 0
  return zx, zy


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (4, 2, 1), (1, 8, 1), (2, 2, 2)])
@pytest.mark.parametrize("B", [8, 16, 64])
def test_sharded_infonce_matches_global(shape, B):
  mesh = _mesh(shape)
  zx, zy = _embeddings(B, seed=B)
  tau = 0.07

  def sharded(a, b):
    out = objective.sharded_infonce(a, b, tau, mesh)
    return out["contrastive_loss"], out

  def reference(a, b):
    out = objective.infonce_reference(a, b, tau)
    return out["contrastive_loss"], out

  with jax.set_mesh(mesh):
    (v1, m1), g1 = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1), has_aux=True))(zx, zy)
  (v2, m2), g2 = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(zx, zy)
  assert float(v2) > 0.1
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for k in m2:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6)


def test_reference_against_hand_computation():
  zx = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  zy = np.array([[1.0, 0.1], [0.2, 1.0], [-1.0, 1.0]])
  tau = 0.5
  nx = zx / np.linalg.norm(zx, axis=1, keepdims=True)
  ny = zy / np.linalg.norm(zy, axis=1, keepdims=True)
  s = nx @ ny.T / tau
  lse_rows = np.log(np.exp(s).sum(1))
  lse_cols = np.log(np.exp(s).sum(0))
  expected = 0.5 * (np.mean(lse_rows - np.diag(s)) + np.mean(lse_cols - np.diag(s)))
  out = objective.infonce_reference(jnp.asarray(zx), jnp.asarray(zy), tau)
  np.testing.assert_allclose(out["contrastive_loss"], expected, rtol=1e-6)
  np.testing.assert_allclose(out["acc_x2y"], np.mean(np.argmax(s, 1) == np.arange(3)))
  np.testing.assert_allclose(out["acc_y2x"], np.mean(np.argmax(s, 0) == np.arange(3)))
  cos = nx @ ny.T
  np.testing.assert_allclose(out["pos_cos"], np.mean(np.diag(cos)), rtol=1e-6)
  np.testing.assert_allclose(out["neg_cos"], (cos.sum() - np.trace(cos)) / 6, rtol=1e-6)


def test_sharded_logits_are_local_rows_times_global_columns():
  """No device may hold the B x B matrix: the largest intermediate is b x B."""
  mesh = _mesh((8, 1, 1))
  B, D = 256, 16
  zx, zy = _embeddings(B, D)
  f = jax.jit(jax.grad(lambda a, b: objective.sharded_infonce(a, b, 0.07, mesh)["contrastive_loss"],
                       argnums=(0, 1)))
  with jax.set_mesh(mesh):
    hlo = f.lower(zx, zy).compile().as_text()
  assert f"f32[{B // 8},{B}]" in hlo
  assert f"f32[{B},{B}]" not in hlo


def test_mlm_loss_counts_only_weighted_positions():
  logits = jnp.log(jnp.array([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))
  labels = jnp.array([[0, 1]])
  weights = jnp.array([[1.0, 0.0]])
  ce, correct, n = mlm.mlm_loss(logits, labels, weights)
  np.testing.assert_allclose(ce, -np.log(0.7), rtol=1e-6)
  assert float(correct) == 1.0 and float(n) == 1.0
