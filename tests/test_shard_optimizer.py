"""ZeRO-1 (mesh.shard_optimizer): Adam's state split over the batch axes, the same update, and
checkpoints that resume under either layout."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from bepa_jax import mesh as mesh_lib
from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from tests.helpers import assert_params_close, devices, tiny_config


def _mesh(shape):
  return jax.sharding.Mesh(np.asarray(devices(8)).reshape(shape), mesh_lib.AXES)


def test_shard_over_batch_picks_the_first_divisible_dimension():
  mesh = _mesh((2, 2, 2))
  ns = lambda *spec: NamedSharding(mesh, P(*spec))
  split = lambda spec, shape: mesh_lib.shard_over_batch(ns(*spec), shape).spec
  assert split((), (8, 6)) == P(("data", "fsdp"), None)      # both batch axes: 4 shards
  assert split((), (6, 8)) == P(None, ("data", "fsdp"))      # 6 is not divisible by 4
  assert split(("tensor", "fsdp"), (400, 32)) == P(("tensor", "data"), "fsdp")  # fsdp in use
  assert split(("tensor",), (6,)) == P("tensor")             # 6 % (2 x 4): stays as it was
  assert split((), ()) == P()                                # Adam's step count
  assert split((None, "fsdp"), (3, 32)) == P(None, ("fsdp", "data"))
  one = _mesh((1, 8, 1))                                     # data of size 1 adds nothing
  assert mesh_lib.shard_over_batch(NamedSharding(one, P(None, "fsdp")), (8, 8)).spec == P(
      None, "fsdp")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("zero1"))  # shared: the tokenizer is trained once


def _moments(opt_state):
  """Adam's mu and nu leaves (every optimizer-state array that is not a scalar)."""
  leaves = jax.tree_util.tree_leaves_with_path(opt_state)
  out = [(jax.tree_util.keystr(p), a) for p, a in leaves if a.ndim]
  assert out and all(".mu" in k or ".nu" in k for k, _ in out)
  return out


def _assert_moments_close(got, ref):
  """mu and nu to rounding of their scale (the largest |mu|, |nu| of the model): the layouts sum
  the gradients in different orders, so a gradient that is ~0 (a key bias, the [CLS] position
  embedding) differs in its rounding noise."""
  got, ref = _moments(got), _moments(ref)
  scale = {k: max(np.abs(np.asarray(b)).max() for n, b in ref if k in n) for k in (".mu", ".nu")}
  for (name, a), (_, b) in zip(got, ref):
    atol = 1e-5 * scale[".mu" if ".mu" in name else ".nu"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol, err_msg=name)


def _two_steps(config, workdir):
  job = build_lib.build(config, workdir, devices(8))
  state, metrics = job.state, []
  with jax.set_mesh(job.mesh):
    for step in range(2):
      state, m = job.step_fn(state, loop.global_batch(job.pipeline.batch(step), job.mesh))
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  return state, metrics


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_optimizer_state_gives_the_same_update(workdir, shape):
  mesh = {"mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2]}
  ref, ref_m = _two_steps(tiny_config(**mesh), workdir)
  got, got_m = _two_steps(tiny_config(**mesh, **{"mesh.shard_optimizer": True}), workdir)
  for a, b in zip(got_m, ref_m):
    for k in ("loss", "mlm_loss", "contrastive_loss", "grad_norm"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)
  assert_params_close(jax.device_get(got.params), jax.device_get(ref.params))
  sizes = dict(zip(mesh_lib.AXES, shape))
  _assert_moments_close(got.opt_state, ref.opt_state)
  for (name, a), (_, b) in zip(_moments(got.opt_state), _moments(ref.opt_state)):
    # Every moment of the tiny model has a dimension the batch shards divide: each moment is
    # split over every batch axis, so a device holds 1/(the axes the parameter lacked) of it.
    axes = lambda x: {n for e in x.sharding.spec if e for n in ((e,) if isinstance(e, str) else e)}
    assert {n for n in mesh_lib.BATCH_AXES if sizes[n] > 1} <= axes(a), (name, a.sharding.spec)
    added = int(np.prod([sizes[n] for n in axes(a) - axes(b)]))
    assert added > 1 and (a.addressable_shards[0].data.size * added
                          == b.addressable_shards[0].data.size), (name, a.sharding.spec)
  for p, s in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
    assert p.sharding == s.sharding  # the parameters keep their own layout


CKPT = {"mesh.data": 4, "mesh.fsdp": 2, "checkpoint.every_steps": 2,
        "checkpoint.every_minutes": 0.0, "checkpoint.async_save": False, "train.log_every": 1}


def _train(workdir, steps, shard):
  cfg = tiny_config(**CKPT, **{"train.steps": steps, "mesh.shard_optimizer": shard})
  state, _ = loop.train(cfg, str(workdir))
  return state


@pytest.mark.parametrize("saved, resumed", [(False, True), (True, False)])
def test_checkpoint_resumes_under_the_other_layout(tmp_path, saved, resumed):
  ref = _train(tmp_path / "ref", 3, saved)
  _train(tmp_path / "wd", 2, saved)
  got = _train(tmp_path / "wd", 3, resumed)  # resumes from step 2, saved under the other layout
  assert int(got.step) == 3
  assert_params_close(jax.device_get(got.params), jax.device_get(ref.params))
  _assert_moments_close(got.opt_state, ref.opt_state)
  for (name, a), (_, b) in zip(_moments(got.opt_state), _moments(ref.opt_state)):
    assert (a.addressable_shards[0].data.size < b.addressable_shards[0].data.size) == resumed
