"""Mini-reproduction on real parallel data: pure MLM (lambda=0) vs BEPA, everything else equal.

Trains the tiny default model twice on Multi30k train (en/de/fr/cs, 29k 4-way aligned
captions), with the same tokenizer, seed, batches and steps, then evaluates both:
retrieval on the Multi30k 2016 test set (all 6 language pairs) and on Tatoeba deu/fra/ces
(out of domain), plus the [CLS]-space diagnostics. Writes bench/results/repro_multi30k.json,
.md (the tables) and .png (spectrum, language maps, similarity histograms).

  python bench/repro_multi30k.py                      # ~6-12 min on 2 busy CPU cores
  python bench/repro_multi30k.py --steps 2000 --global_batch 128
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import subprocess
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
LANGS = ("en", "de", "fr", "cs")


def train_tokenizer(source: str, vocab_size: int, out: str) -> int:
  """`bepa-tokenizer train`, run as a user runs it (its own process); its exit status."""
  return subprocess.run([sys.executable, "-m", "bepa_jax.cli.tokenizer", "train", "--input",
                         source, "--vocab-size", str(vocab_size), "--out", out]).returncode


def train_source(data_dir: str) -> str:
  """Multi30k train as a `data.source` (4-way line-aligned .gz files), as a user would give it."""
  return f"aligned:{data_dir}/train.{{{','.join(LANGS)}}}"


def make_config(args, source: str, tokenizer_path: str, test_files, weight: float):
  from bepa_jax.config import defaults as default_config
  c = default_config.get_config()  # the tiny default model: hidden 128, 2 layers, 4 heads
  c.loss.weight = weight
  c.tokenizer.path = tokenizer_path
  c.data.source = source
  c.data.max_length = args.max_length
  c.train.steps = args.steps
  c.train.global_batch = args.global_batch
  c.train.log_every = max(args.steps // 10, 1)
  c.optim.warmup_steps = max(args.steps // 20, 1)
  c.optim.learning_rate = args.learning_rate
  c.eval.every_steps = args.eval_every  # periodic evaluation, logged to metrics.jsonl
  c.eval.parallel = ",".join(test_files[:2])
  c.eval.max_sentences = 300
  c.eval.pooling = "cls"
  return c


def train_one(config, workdir):
  """bepa-train's own entry point (`loop.train`), on the config's data.source."""
  from bepa_jax.trainer import loop
  return loop.train(config, workdir)


def combine_pngs(paths, out_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  images = [plt.imread(p) for p in paths]
  width = max(im.shape[1] for im in images)
  heights = [im.shape[0] * width / im.shape[1] for im in images]
  fig, axes = plt.subplots(len(images), 1, figsize=(width / 110, sum(heights) / 110),
                           gridspec_kw={"height_ratios": heights})
  for ax, im in zip(axes, images):
    ax.imshow(im)
    ax.axis("off")
  fig.subplots_adjust(0, 0, 1, 1, 0, 0.01)
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def table(reports) -> str:
  """The headline table: one row per metric, one column per run."""
  names = list(reports)
  rows = []

  def row(label, get, fmt="{:.1f}"):
    rows.append(f"| {label} | " + " | ".join(fmt.format(get(reports[n])) for n in names) + " |")

  for pool in ("cls", "mean"):
    for pair in ("en-de", "en-fr", "en-cs", "de-fr"):
      a, b = pair.split("-")
      row(f"Multi30k test {a}->{b} / {b}->{a} top-1 % ({pool})",
          lambda r: (100 * r["retrieval"]["multi30k"][pair][pool][f"{a}->{b}"],
                     100 * r["retrieval"]["multi30k"][pair][pool][f"{b}->{a}"]),
          "{0[0]:.1f} / {0[1]:.1f}")
    for lang in ("deu", "fra", "ces"):
      row(f"Tatoeba {lang}->eng / eng->{lang} top-1 % ({pool})",
          lambda r: (100 * r["retrieval"]["tatoeba"][lang][f"{lang}-eng"][pool][f"{lang}->eng"],
                     100 * r["retrieval"]["tatoeba"][lang][f"{lang}-eng"][pool][f"eng->{lang}"]),
          "{0[0]:.1f} / {0[1]:.1f}")
  row("Multi30k en->de top-1 % (cls + ratio margin)",
      lambda r: 100 * r["retrieval"]["multi30k"]["en-de"]["cls+ratio"]["en->de"])
  d = lambda r, k: r["diagnostics"]["cls"][k]
  row("[CLS] effective rank", lambda r: d(r, "effective_rank"), "{:.2f}")
  row("[CLS] PC1 variance share", lambda r: d(r, "pc1_share"), "{:.1%}")
  row("[CLS] alignment (lower = closer pairs)", lambda r: d(r, "alignment"), "{:.3f}")
  row("[CLS] uniformity (lower = more uniform)", lambda r: d(r, "uniformity"), "{:.3f}")
  row("[CLS] mean cos translation / random pairs",
      lambda r: (d(r, "pair_cos"), d(r, "random_cos")), "{0[0]:.3f} / {0[1]:.3f}")
  row("[CLS] gap (pairs - random)", lambda r: d(r, "gap"), "{:.3f}")
  row("final MLM loss", lambda r: r["train"]["mlm_loss"], "{:.3f}")
  head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
  return head + "\n".join(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", default=SHARED, help="dir holding multi30k/ and tatoeba/")
  p.add_argument("--steps", type=int, default=1200)
  p.add_argument("--global_batch", type=int, default=32)
  p.add_argument("--max_length", type=int, default=24)
  p.add_argument("--learning_rate", type=float, default=2e-3)
  p.add_argument("--vocab_size", type=int, default=2000)
  p.add_argument("--eval_every", type=int, default=600)
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  p.add_argument("--workdir", default="", help="keep the two training workdirs here")
  args = p.parse_args(argv)
  m30k, tatoeba = os.path.join(args.data, "multi30k"), os.path.join(args.data, "tatoeba")
  if not (os.path.isdir(m30k) and os.path.isdir(tatoeba)):
    print(f"repro_multi30k: error: need {m30k} and {tatoeba}", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  import jax
  from bepa_jax import mesh as mesh_lib
  from bepa_jax.data import tokenizer as tokenizer_lib
  from bepa_jax.eval import diagnostics, embed, retrieval, suite

  t0 = time.time()
  root = args.workdir or tempfile.mkdtemp(prefix="repro_multi30k_")
  source = train_source(m30k)
  if train_tokenizer(source, args.vocab_size, os.path.join(root, "tokenizer")):
    return 2
  spm = os.path.join(root, "tokenizer", "spm.model")
  test_files = [os.path.join(m30k, f"test_2016_flickr.{l}.gz") for l in LANGS]
  sets = [retrieval.read_tatoeba(tatoeba, l) for l in ("deu", "fra", "ces")]
  sets.append(retrieval.read_parallel(test_files, name="multi30k"))

  runs = {"MLM (lambda=0)": 0.0, "BEPA (lambda=1)": 1.0}
  reports, plots = {}, {}
  for name, weight in runs.items():
    config = make_config(args, source, spm, test_files, weight)
    workdir = os.path.join(root, "mlm" if weight == 0 else "bepa")
    t = time.time()
    state, metrics = train_one(config, workdir)
    train_s = time.time() - t
    from bepa_jax.model import BepaEncoder, EncoderConfig
    tok = tokenizer_lib.SentencePieceTokenizer(spm)
    model = BepaEncoder(EncoderConfig.from_config(config.model, vocab_size=tok.vocab_size))
    mesh = mesh_lib.create_mesh(config.mesh)
    embedder = embed.Embedder(model, state.params, tok, mesh, max_length=args.max_length,
                              batch_size=128, rules=mesh_lib.rules(config.mesh))
    report, plot = suite.run(embedder, sets, margin="ratio")
    report["train"] = {**{k: float(v) for k, v in metrics.items()}, "seconds": train_s,
                       "workdir": workdir}
    reports[name], plots[name] = report, plot
    logging.info("%s: trained in %.0f s, evaluated", name, train_s)

  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, "repro_multi30k")
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "data")}
  settings["devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}"
  with open(base + ".json", "w") as f:
    json.dump({"settings": settings, "runs": reports}, f, indent=2)
  with tempfile.TemporaryDirectory() as tmp:
    pngs = diagnostics.save_plots({n: p["cls"] for n, p in plots.items()}, tmp)
    combine_pngs(pngs, base + ".png")
  cmd = ("python bench/repro_multi30k.py " + " ".join(argv if argv is not None else sys.argv[1:])
         ).strip()
  md = (f"# Multi30k mini-reproduction: MLM vs BEPA\n\n`{cmd}` — tiny default model (hidden 128, "
        f"2 layers), {args.steps} steps x {args.global_batch} pairs, max_length "
        f"{args.max_length}, {settings['devices']}; total {time.time() - t0:.0f} s.\n\n"
        f"{table(reports)}\n\nFull detail of both eval suites (all pairs, both poolings, margin) "
        f"in repro_multi30k.json; plots ([CLS]) in repro_multi30k.png.\n\n"
        + suite.markdown(reports).split("\n", 2)[2])
  with open(base + ".md", "w") as f:
    f.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
