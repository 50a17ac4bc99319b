"""The streaming log-sum-exp InfoNCE equals the plain sharded one, in value and in gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from bepa_jax.objective import infonce as objective
from bepa_jax.objective.infonce import Options
from bepa_jax.errors import ConfigError


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _embeddings(B, D=24, seed=0):
  kx, ky = jax.random.split(jax.random.key(seed))
  zx = jax.random.normal(kx, (B, D))
  zy = 0.6 * zx + jax.random.normal(ky, (B, D))
  return zx, zy


def _value_and_grad(fn, mesh, zx, zy):
  def loss(a, b):
    out = fn(a, b)
    return out["contrastive_loss"], out
  with jax.set_mesh(mesh):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(zx, zy)


@pytest.mark.parametrize("shape,chunk", [((8, 1, 1), 16), ((2, 4, 1), 8), ((1, 8, 1), 64),
                                         ((2, 2, 2), 32)])
def test_chunked_matches_plain(shape, chunk):
  mesh = _mesh(shape)
  zx, zy = _embeddings(64, seed=chunk)
  tau = 0.07
  (v1, m1), g1 = _value_and_grad(lambda a, b: objective.sharded_infonce(a, b, tau, mesh), mesh,
                                 zx, zy)
  (v2, m2), g2 = _value_and_grad(lambda a, b: objective.sharded_infonce(a, b, tau, mesh,
                                                                          Options(chunk=chunk)),
                                 mesh, zx, zy)
  assert float(v1) > 0.1
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  for k in m1:
    np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_streaming_lse_is_logsumexp_with_large_logits():
  """The online max keeps it finite where exp overflows (logits ~ 1/tau = 1000)."""
  a, c = _embeddings(32, D=8, seed=3)
  a, c = objective.l2_normalize(a), objective.l2_normalize(c)
  lse, mx = objective.streaming_lse(a, c, 1000.0, 8)
  ref = jax.nn.logsumexp((a @ c.T) * 1000.0, axis=1)
  np.testing.assert_allclose(lse, ref, rtol=1e-6)
  np.testing.assert_allclose(mx, jnp.max((a @ c.T) * 1000.0, axis=1), rtol=1e-6)
  g = jax.grad(lambda a: objective.streaming_lse(a, c, 1000.0, 8)[0].sum())(a)
  g_ref = jax.grad(lambda a: jax.nn.logsumexp((a @ c.T) * 1000.0, axis=1).sum())(a)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_chunked_holds_b_by_chunk_logits_only():
  mesh = _mesh((8, 1, 1))
  B, D, chunk = 512, 16, 32
  zx, zy = _embeddings(B, D)
  f = jax.jit(jax.grad(lambda a, b: objective.sharded_infonce(a, b, 0.07, mesh, Options(chunk=chunk))[
      "contrastive_loss"], argnums=(0, 1)))
  with jax.set_mesh(mesh):
    hlo = f.lower(zx, zy).compile().as_text()
  assert f"f32[{B // 8},{chunk}]" in hlo
  assert f"f32[{B // 8},{B}]" not in hlo


def test_chunk_must_divide_batch():
  mesh = _mesh((8, 1, 1))
  zx, zy = _embeddings(64)
  with pytest.raises(ConfigError, match="loss.contrastive_chunk=24"):
    with jax.set_mesh(mesh):
      objective.sharded_infonce(zx, zy, 0.07, mesh, Options(chunk=24))
