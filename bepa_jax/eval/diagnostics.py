"""Is the sentence space collapsed or full-rank, language-bound or language-agnostic?

`compute` turns the embeddings of aligned sets into JSON numbers (spectrum, effective rank,
PC1 share, alignment/uniformity, pair vs random cosine and gap, per language pair) plus the
arrays the plots need; `save_plots` draws one or several models side by side (matplotlib Agg):
  spectrum.png          normalised singular-value spectrum (explained variance per component)
  map.png               2-D maps (PCA and t-SNE) coloured by language, one row per model
  similarity_hist.png   cosine of translation pairs vs random pairs, one panel per model
"""
from __future__ import annotations

import os

import numpy as np

from bepa_jax.eval import metrics


def _points(sets, embeddings, pool):
  """All embeddings of all sets, with their language labels."""
  xs, labels = [], []
  for ps, emb in zip(sets, embeddings):
    for lang in ps.languages:
      xs.append(emb[lang][pool])
      labels += [lang] * len(emb[lang][pool])
  return np.concatenate(xs), np.asarray(labels)


def compute(sets, embeddings, poolings=("cls", "mean"), *, max_points: int = 20000,
            uniformity_points: int = 2000, map_per_lang: int = 100, seed: int = 0):
  """(json dict {pool: {...}}, plot data {pool: {...}}) for aligned sets and their embeddings."""
  rng = np.random.default_rng(seed)
  report, plot = {}, {}
  for pool in poolings:
    x, labels = _points(sets, embeddings, pool)
    if len(x) > max_points:
      keep = np.sort(rng.choice(len(x), max_points, replace=False))
      x_sub = x[keep]
    else:
      x_sub = x
    s = metrics.singular_values(x_sub)
    u = x_sub if len(x_sub) <= uniformity_points else x_sub[
        rng.choice(len(x_sub), uniformity_points, replace=False)]
    per_pair, pair_sims, rand_sims = {}, [], []
    align_sum, n_pairs = 0.0, 0
    for ps, emb in zip(sets, embeddings):
      for i, j in ps.pairs():
        a, b = ps.languages[i], ps.languages[j]
        zx, zy = emb[a][pool], emb[b][pool]
        sim = metrics.cosine_matrix(zx, zy)
        stats = metrics.pair_cosine_stats(zx, zy)
        stats["alignment"] = metrics.alignment(zx, zy)
        key = f"{a}-{b}"
        per_pair[key if key not in per_pair else f"{ps.name}:{key}"] = stats
        n = len(zx)
        pair_sims.append(np.diag(sim))
        off = rng.integers(1, n, size=n)  # a random non-aligned column for every row
        rand_sims.append(sim[np.arange(n), (np.arange(n) + off) % n])
        align_sum += stats["alignment"] * n
        n_pairs += n
    pair_sims, rand_sims = np.concatenate(pair_sims), np.concatenate(rand_sims)
    pair_cos = float(np.mean([v["pair_cos"] for v in per_pair.values()]))
    random_cos = float(np.mean([v["random_cos"] for v in per_pair.values()]))
    report[pool] = {
        "num_points": int(len(x_sub)),
        "dim": int(x.shape[1]),
        "effective_rank": metrics.effective_rank_of_spectrum(s),
        "pc1_share": metrics.pc1_share_of_spectrum(s),
        "uniformity": metrics.uniformity(u),
        "alignment": align_sum / max(n_pairs, 1),
        "pair_cos": pair_cos,
        "random_cos": random_cos,
        "gap": pair_cos - random_cos,
        "pairs": per_pair,
    }
    # The map: the first `map_per_lang` points of each language.
    idx = np.concatenate([np.flatnonzero(labels == l)[:map_per_lang]
                          for l in dict.fromkeys(labels)])
    plot[pool] = {"spectrum": s, "map_points": x[idx], "map_labels": labels[idx],
                  "pair_sims": pair_sims, "random_sims": rand_sims,
                  "effective_rank": report[pool]["effective_rank"],
                  "pc1_share": report[pool]["pc1_share"], "gap": report[pool]["gap"]}
  return report, plot


def _pca2(x):
  x = np.asarray(x, np.float64)
  x = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:2].T


def _tsne2(x, seed):
  from sklearn.manifold import TSNE
  n = len(x)
  perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
  return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
              max_iter=500).fit_transform(np.asarray(x, np.float64))


def save_plots(runs: dict, out_dir: str, *, tsne: bool = True, seed: int = 0) -> list[str]:
  """runs: {model name: plot data of one pooling (from `compute`)}; returns the PNG paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  names = list(runs)
  paths = []

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in names:
    r = runs[name]
    v = np.asarray(r["spectrum"], np.float64) ** 2
    ax.plot(np.arange(1, len(v) + 1), v / v.sum(),
            label=f"{name} (erank {r['effective_rank']:.1f}, PC1 {100 * r['pc1_share']:.1f}%)")
  ax.set_yscale("log")
  ax.set_xlabel("principal component")
  ax.set_ylabel("share of variance")
  ax.set_title("Singular-value spectrum of the centred embeddings")
  ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "spectrum.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  methods = [("PCA", _pca2)] + ([("t-SNE", lambda x: _tsne2(x, seed))] if tsne else [])
  fig, axes = plt.subplots(len(names), len(methods), figsize=(5 * len(methods), 4.2 * len(names)),
                           squeeze=False)
  for row, name in enumerate(names):
    r = runs[name]
    langs = list(dict.fromkeys(r["map_labels"].tolist()))
    cmap = plt.get_cmap("tab20" if len(langs) > 10 else "tab10")
    for col, (method, fn) in enumerate(methods):
      ax = axes[row, col]
      xy = fn(r["map_points"])
      for li, lang in enumerate(langs):
        sel = r["map_labels"] == lang
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(li % cmap.N), label=lang)
      ax.set_title(f"{name}: {method}")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[row, 0].legend(fontsize=7, markerscale=2, loc="best")
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "map.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
  for col, name in enumerate(names):
    r, ax = runs[name], axes[0, col]
    bins = np.linspace(-1, 1, 81)
    ax.hist(r["random_sims"], bins=bins, alpha=0.6, density=True, label="random pairs")
    ax.hist(r["pair_sims"], bins=bins, alpha=0.6, density=True, label="translation pairs")
    ax.set_title(f"{name}: gap {r['gap']:.3f}")
    ax.set_xlabel("cosine")
    ax.legend(fontsize=8)
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "similarity_hist.png"))
  fig.savefig(paths[-1], dpi=110)
  plt.close(fig)
  return paths
