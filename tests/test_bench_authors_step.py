"""bench/authors_step.py: the PyTorch peer computes our objective (same weights, same batches,
dropout off: equal losses for three steps, so the updates agree too), its tensors are our
batches without the padding, and the script runs end to end on a micro config."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="needs torch and transformers (the peer)")

sys.path.insert(0, os.path.join(REPO, "bench"))
import authors_peer  # noqa: E402
import authors_step  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return authors_step.tokenizer_path("embedded", 400, str(tmp_path_factory.mktemp("spm")))


def _job(tokenizer, tmp_path, mlm, family="bert", noise=0.0):
  """Our micro job on one device; `noise` perturbs the initial weights (random [CLS]s)."""
  import jax
  cfg = authors_step.make_config("micro", mlm, family, 0.0, "embedded", tokenizer)
  job = authors_step.build_ours(cfg, str(tmp_path))
  if noise:
    keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(job.state.params))))
    params = jax.tree.map(lambda p: p + noise * jax.random.normal(next(keys), p.shape, p.dtype),
                          job.state.params)
    job.state = job.state.replace(params=params)
  return job


def test_peer_infonce_is_ours_with_their_candidate_set():
  """concat[z_y, z_x] candidates, self term unmasked = same_language=True, mask_self=False."""
  import torch
  from bepa_jax.objective import infonce
  rng = np.random.default_rng(0)
  hx, hy = rng.normal(size=(2, 6, 16)).astype(np.float32)
  hy = hy + 2 * hx  # positives closer than negatives
  want = infonce.infonce_reference(hx, hy, 0.07, infonce.Options(same_language=True,
                                                                 mask_self=False))
  got = authors_peer.peer_infonce(torch.from_numpy(hx), torch.from_numpy(hy), 0.07)
  assert float(got) == pytest.approx(float(want["contrastive_loss"]), rel=1e-5)
  masked = infonce.infonce_reference(hx, hy, 0.07, infonce.Options(same_language=True))
  assert abs(float(got) - float(masked["contrastive_loss"])) > 1e-2  # the flag matters


@pytest.mark.parametrize("mlm,family", [("pair", "bert"), ("sentence", "bert"),
                                        ("pair", "xlmr")])
def test_peer_loss_equals_ours_for_three_steps(tokenizer, tmp_path, mlm, family):
  import jax
  from bepa_jax.trainer import loop
  job = _job(tokenizer, tmp_path, mlm, family, noise=0.2)
  host = [job.pipeline.batch(s) for s in range(3)]
  peers = [authors_peer.peer_batch(b, mlm) for b in host]
  spec, weights = authors_peer.peer_spec(job), authors_peer.initial_weights(job)
  ours, state = [], job.state
  for b in host:
    with jax.set_mesh(job.mesh):
      state, m = job.step_fn(state, loop.global_batch(b, job.mesh))
    ours.append({k: float(m[k]) for k in ("loss", "mlm_loss", "contrastive_loss")})
  # distinct [CLS]s: the contrastive term is not the ln(2B) of identical embeddings
  assert abs(ours[0]["contrastive_loss"] - np.log(2 * len(host[0]["input_ids"]))) > 0.05
  for variant in authors_peer.VARIANTS:
    step, _ = authors_peer.build_peer_step(spec, peers, variant, weights)
    for i, want in enumerate(ours):
      step()
      for k, v in want.items():
        assert step.last[k] == pytest.approx(v, abs=1e-4), (variant, i, k)


def test_peer_batch_is_ours_without_padding(tokenizer, tmp_path):
  for mlm in authors_step.MLM_MODES:
    b = _job(tokenizer, tmp_path / mlm, mlm).pipeline.batch(0)
    p = authors_peer.peer_batch(b, mlm)
    lengths = b["attention_mask"].sum(-1)            # [B, 2]
    Lc = int(lengths.max())                          # the longest sentence, x or y
    assert p["x_ids"].shape[1] == p["y_ids"].shape[1] == Lc
    np.testing.assert_array_equal(p["x_ids"], b["input_ids"][:, 0, :Lc])
    np.testing.assert_array_equal(p["y_mask"].sum(-1), lengths[:, 1])
    picked = p["mlm_labels"] != -100
    assert picked.sum() == b["mlm_weights"].sum()    # the same masked positions and labels
    assert sorted(p["mlm_labels"][picked]) == sorted(b["mlm_ids"][b["mlm_weights"] > 0])
    c = authors_peer.token_counts(b, mlm, p)
    from bepa_jax.training import throughput  # what bepa-train logs: the same passes, the same count
    ours = throughput.count(b, authors_step.make_config("micro", mlm).loss)
    assert (ours.real, ours.nonpad, ours.processed) == (c["real"], c["nonpad"], c["ours"])
    assert c["real"] == lengths.sum() and c["peer"] <= c["ours"]
    assert c["nonpad"] == c["real"] + (b["mlm_attention_mask"].sum() if mlm == "pair"
                                       else c["real"])
    if mlm == "pair":
      assert p["mlm_ids"].shape == (len(lengths), int(b["mlm_attention_mask"].sum(-1).max()))
    else:
      assert p["mlm_ids"].shape == (2 * len(lengths), Lc)


def test_script_runs_ours_and_a_peer_worker(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, "bench/authors_step.py", "--configs", "micro",
                      "--data", "embedded", "--reps", "2", "--warmup", "1", "--peer", "gathered",
                      "--torch_malloc", "retain", "--cache", str(tmp_path / "cache"),
                      "--results_dir", str(tmp_path), "--tag", "t"],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads((tmp_path / "authors_step_t.json").read_text())
  assert (tmp_path / "authors_step_t.png").stat().st_size > 0
  res = out["results"][0]
  assert set(res["times_s"]) == {"ours", "authors_gathered/retain"}
  for k in res["times_s"]:
    assert len(res["times_s"][k]) == 2 and all(t > 0 for t in res["times_s"][k])
    assert res[k]["real_tokens_per_s"] == pytest.approx(res["real_tokens_per_step"]
                                                        / res[k]["step_s"])
    assert res[k]["padding_overhead"] >= 1.0
    assert res[k]["padding_fraction"] == pytest.approx(1 - 1 / res[k]["padding_overhead"])
  # same weights and batches, dropout 0.1 on both: step-0 losses close, not equal
  assert res["losses"]["ours"][0] == pytest.approx(res["losses"]["authors_gathered/retain"][0],
                                                   abs=0.5)
  assert "rep 2/2" in r.stdout and "| micro | pair | ours |" in r.stdout
