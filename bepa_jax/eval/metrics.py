"""Metrics of an embedding space, in numpy (inputs are host arrays of at most a few 10k rows).

Definitions follow docs/objective.md:
  effective rank (Roy & Vetterli 2007)  exp(H(p)), p_k = s_k / sum(s), s = singular values of
                                        the centred embedding matrix
  PC1 share                             s_1^2 / sum(s_k^2): variance on the first principal axis
  alignment (Wang & Isola 2020)         E_pairs ||z(x) - z(y)||^2          (z: L2-normalised)
  uniformity                            log E_{u != v} exp(-2 ||z(u) - z(v)||^2)
  discrimination gap                    mean cos(translation pairs) - mean cos(random pairs)
  ratio margin (Artetxe & Schwenk 2019) cos(x, y) / (mean_k-NN cos(x, .) / 2 + mean_k-NN cos(., y) / 2)
"""
from __future__ import annotations

import numpy as np


def l2_normalize(x, eps: float = 1e-12) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_matrix(x, y) -> np.ndarray:
  """[N, D] x [M, D] -> [N, M] cosine similarities."""
  return l2_normalize(x) @ l2_normalize(y).T


# ----------------------------------------------------------------------------- spectrum
def singular_values(x) -> np.ndarray:
  """Singular values (descending) of the row-centred matrix x [N, D]."""
  x = np.asarray(x, np.float64)
  return np.linalg.svd(x - x.mean(axis=0, keepdims=True), compute_uv=False)


def effective_rank_of_spectrum(s) -> float:
  """exp(entropy of s / sum(s)); 0 * log 0 counts as 0. n equal values give n."""
  s = np.asarray(s, np.float64)
  total = s.sum()
  if total <= 0:
    return 0.0
  p = s[s > 0] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def effective_rank(x) -> float:
  return effective_rank_of_spectrum(singular_values(x))


def pc1_share_of_spectrum(s) -> float:
  """Share of the total variance on the first principal component."""
  v = np.asarray(s, np.float64) ** 2
  return float(v[0] / v.sum()) if v.sum() > 0 else 0.0


def pc1_share(x) -> float:
  return pc1_share_of_spectrum(singular_values(x))


# ----------------------------------------------------------------------------- Wang & Isola
def alignment(zx, zy, alpha: float = 2.0) -> float:
  """Mean ||z(x_i) - z(y_i)||^alpha over aligned pairs (inputs are L2-normalised here)."""
  d = np.linalg.norm(l2_normalize(zx) - l2_normalize(zy), axis=-1)
  return float(np.mean(d ** alpha))


def uniformity(z, t: float = 2.0) -> float:
  """log of the mean Gaussian potential exp(-t ||u - v||^2) over distinct pairs u != v."""
  z = l2_normalize(z)
  n = z.shape[0]
  if n < 2:
    raise ValueError(f"uniformity needs at least 2 points, got {n}")
  sq = np.maximum(2.0 - 2.0 * (z @ z.T), 0.0)  # ||u - v||^2 on the unit sphere
  iu = np.triu_indices(n, k=1)
  return float(np.log(np.mean(np.exp(-t * sq[iu]))))


# ----------------------------------------------------------------------------- pairs
def pair_cosine_stats(zx, zy) -> dict:
  """Mean cosine of aligned pairs (diagonal), of all non-aligned pairs, and their gap."""
  sim = cosine_matrix(zx, zy)
  n, m = sim.shape
  if n != m or n < 2:
    raise ValueError(f"need >= 2 aligned pairs, got shapes {np.shape(zx)} and {np.shape(zy)}")
  diag = np.diag(sim)
  pair = float(diag.mean())
  rand = float((sim.sum() - diag.sum()) / (n * (n - 1)))
  return {"pair_cos": pair, "random_cos": rand, "gap": pair - rand}


# ----------------------------------------------------------------------------- retrieval
def top1_accuracy(sim) -> dict:
  """Row i's gold is column i. x2y: argmax over each row; y2x: argmax over each column.

  Ties go to the lowest index (np.argmax), so a constant matrix scores only row/column 0.
  """
  sim = np.asarray(sim)
  n, m = sim.shape
  if n != m:
    raise ValueError(f"aligned retrieval needs a square similarity matrix, got {sim.shape}")
  gold = np.arange(n)
  return {"x2y": float(np.mean(np.argmax(sim, axis=1) == gold)),
          "y2x": float(np.mean(np.argmax(sim, axis=0) == gold))}


def margin_scores(sim, k: int = 4, mode: str = "ratio") -> np.ndarray:
  """BUCC-style margin rescoring of a cosine matrix sim [N, M] (Artetxe & Schwenk 2019).

  r_x[i] = mean of row i's k largest cosines, r_y[j] = mean of column j's k largest;
  ratio:    sim[i, j] / ((r_x[i] + r_y[j]) / 2)
  distance: sim[i, j] - (r_x[i] + r_y[j]) / 2
  It penalises hubs (candidates close to everything), the failure mode of plain cosine.
  """
  sim = np.asarray(sim, np.float64)
  kx, ky = min(k, sim.shape[1]), min(k, sim.shape[0])
  r_x = -np.sort(-sim, axis=1)[:, :kx].mean(axis=1)
  r_y = -np.sort(-sim, axis=0)[:ky, :].mean(axis=0)
  denom = (r_x[:, None] + r_y[None, :]) / 2.0
  if mode == "ratio":
    return sim / denom
  if mode == "distance":
    return sim - denom
  raise ValueError(f"margin mode must be 'ratio' or 'distance', got {mode!r}")


def retrieval_accuracy(zx, zy, margin: str | None = None, k: int = 4) -> dict:
  """Top-1 accuracy both ways of aligned embeddings, by cosine or by a margin score."""
  sim = cosine_matrix(zx, zy)
  if margin:
    sim = margin_scores(sim, k=k, mode=margin)
  return top1_accuracy(sim)
