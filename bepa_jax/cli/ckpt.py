"""`bepa-ckpt`: what a workdir's checkpoints hold, without a device or the training code.

  bepa-ckpt list WORKDIR            one line per checkpoint: step, time, loss, size, checksums
  bepa-ckpt show WORKDIR [--step N] one checkpoint: time, config summary, parameter count, ...
  bepa-ckpt verify WORKDIR          recomputes every checkpoint's checksums; exit 1 if one fails
  bepa-ckpt import HF_DIR WORKDIR [--config FILE] [--config.a.b=v ...]
                                    step-0 checkpoint of the train state initialised from an HF
                                    (or sentence-transformers) checkpoint, without a training step

WORKDIR may also be its checkpoints/ directory, or a gs:// path. `import` is
`bepa-train --config.init.hf_dir=HF_DIR --config.train.steps=0`: it needs jax and the training
code (the other commands do not); pass the config the workdir will be trained with.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys

from bepa_jax.cli import common as cli

PROG = "bepa-ckpt"
SUMMARY_KEYS = ("model.family", "model.hidden_size", "model.num_layers", "model.num_heads",
                "model.intermediate_size", "model.vocab_size", "tokenizer.vocab_size",
                "train.global_batch", "train.steps", "optim.learning_rate", "loss.weight",
                "loss.temperature", "data.source", "data.max_length")


def _when(t) -> str:
  if t is None:
    return "?"
  return datetime.datetime.fromtimestamp(float(t)).strftime("%Y-%m-%d %H:%M:%S")


def _size(path) -> int:
  """Bytes under `path` (walked one level at a time: epath refuses '**' for gs://)."""
  return sum(_size(p) if p.is_dir() else p.stat().length for p in path.iterdir())


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def _param_count(ckpt, step: int) -> int | None:
  """From the stored array shapes of the params subtree (not from what the trainer claimed)."""
  import jax
  try:
    tree = ckpt.manager.item_metadata(step)["state"]
    leaves = jax.tree.leaves(tree["params"], is_leaf=lambda x: hasattr(x, "shape"))
    return int(sum(math.prod(x.shape) for x in leaves))
  except Exception:  # noqa: BLE001  (older layout: fall back to the metadata)
    return None


def _meta(ckpt, step: int) -> dict:
  try:
    return ckpt.meta(step)
  except Exception as e:  # noqa: BLE001
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def _verdict(ckpt, step: int) -> str:
  """'verified (N MiB read)', 'not verified: why' or 'DAMAGED: what' (integrity.py)."""
  from bepa_jax.checkpoint import integrity
  try:
    v = integrity.verify(ckpt.directory / str(step))
  except OSError as e:
    return f"DAMAGED: {type(e).__name__}: {cli.one_line(e)[:200]}"
  if not v.ok:
    return f"DAMAGED: {v.problem}"
  if not v.checked:
    return f"not verified: {v.problem}"
  return f"verified ({_human(v.bytes_read)} read)"


def cmd_list(ckpt, out) -> int:
  steps = ckpt.steps()
  tmp = sorted(p.name for p in ckpt.directory.glob("*.orbax-checkpoint-tmp*")) \
      if ckpt.directory.exists() else []
  if not steps and not tmp:
    print(f"no checkpoints in {ckpt.directory}", file=out)
    return 0
  print(f"{'step':>8}  {'saved':19}  {'loss':>9}  {'size':>9}  note", file=out)
  for step in steps:
    meta = _meta(ckpt, step)
    loss = meta.get("metrics", {}).get("loss")
    loss = f"{loss:9.4f}" if isinstance(loss, (int, float)) else f"{'-':>9}"
    verdict = _verdict(ckpt, step)
    note = verdict if not verdict.startswith("verified") else "checksums ok"
    if "error" in meta and not verdict.startswith("DAMAGED"):
      note = "DAMAGED: unreadable metadata"
    print(f"{step:>8}  {_when(meta.get('time')):19}  {loss}  "
          f"{_human(_size(ckpt.directory / str(step))):>9}  {note}", file=out)
  for name in tmp:
    print(f"{'-':>8}  {'':19}  {'':>9}  {'':>9}  {name}: incomplete (interrupted save), ignored",
          file=out)
  return 0


def cmd_show(ckpt, step: int | None, out) -> int:
  steps = ckpt.steps()
  if not steps:
    raise ValueError(f"no checkpoints in {ckpt.directory}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {ckpt.directory} (has {steps})")
  meta = _meta(ckpt, step)
  if "error" in meta:
    raise ValueError(f"checkpoint {step} metadata cannot be read: {meta['error']}")
  from bepa_jax.checkpoint.store import config_value
  n = _param_count(ckpt, step)
  n = meta.get("num_params") if n is None else n
  print(f"checkpoint  {ckpt.directory / str(step)}", file=out)
  print(f"step        {step}", file=out)
  print(f"saved       {_when(meta.get('time'))}", file=out)
  print(f"parameters  {n:,}" if n is not None else "parameters  ?", file=out)
  print(f"size        {_human(_size(ckpt.directory / str(step)))}", file=out)
  print(f"checksums   {_verdict(ckpt, step)}", file=out)
  print(f"mesh        {meta.get('mesh')} on {meta.get('process_count')} process(es)", file=out)
  ds = meta.get("data_state") or {}
  print(f"data_state  next_step {ds.get('next_step')}, start_step {ds.get('start_step', 0)}, "
        f"fingerprint {ds.get('data_fingerprint')}", file=out)
  print(f"rng         {meta.get('rng')}", file=out)
  metrics = meta.get("metrics") or {}
  if metrics:
    print("metrics     " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())), file=out)
  print("config", file=out)
  for key in SUMMARY_KEYS:
    print(f"  {key:24} {config_value(meta.get('config') or {}, key)!r}", file=out)
  return 0


def cmd_verify(ckpt, out) -> int:
  """Every checkpoint's checksums; exit 1 naming each damaged one (0 when all are good)."""
  import time
  steps = ckpt.steps()
  if not steps:
    raise ValueError(f"no checkpoints in {ckpt.directory}")
  bad = unchecked = 0
  t0 = time.perf_counter()
  for step in steps:
    verdict = _verdict(ckpt, step)
    bad += verdict.startswith("DAMAGED")
    unchecked += verdict.startswith("not verified")
    print(f"{step:>8}  {verdict}", file=out)
  seconds = time.perf_counter() - t0
  total = sum(_size(ckpt.directory / str(s)) for s in steps)
  print(f"{len(steps) - bad - unchecked} of {len(steps)} checkpoints verified, {bad} damaged, "
        f"{unchecked} without checksums ({_human(total)} in {seconds:.1f}s)", file=out)
  if bad:
    print(f"{PROG}: error: {bad} damaged checkpoint(s) in {ckpt.directory}: training, bepa-eval "
          f"and bepa-export skip them and use the newest good one", file=sys.stderr)
  return 1 if bad else 0


def cmd_import(hf_dir: str, workdir: str, config_file: str | None, overrides: list[str]) -> int:
  """bepa-train's run of the config with init.hf_dir=HF_DIR and train.steps=0 (last, so that
  they win): the same checks, set-up and messages, under the name `bepa-ckpt import`."""
  import os
  if not os.path.isdir(hf_dir):
    return cli.fail(PROG, f"{hf_dir}: HF model directory not found")
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad:
    return cli.fail(PROG, f"import: unrecognized argument {bad[0]} (only --config FILE and "
                    f"--config.a.b=value)")
  from bepa_jax.config import load as config_load
  prog = f"{PROG} import"
  overrides = overrides + [f"--config.init.hf_dir={hf_dir}", "--config.train.steps=0"]
  try:
    config = config_load.load_config(config_file or config_load.DEFAULT_CONFIG_FILE, overrides)
  except (ValueError, OSError) as e:  # ConfigError is a ValueError
    return cli.fail(prog, e)
  from bepa_jax.cli import train as train_cli  # its start, after the flags
  return train_cli.start(prog, config, workdir)


def main(argv=None, out=None) -> int:
  out = out or sys.stdout
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p_list = sub.add_parser("list", help="the checkpoints of a workdir")
  p_list.add_argument("workdir")
  p_show = sub.add_parser("show", help="one checkpoint (default: the latest)")
  p_show.add_argument("workdir")
  p_show.add_argument("--step", type=int, default=None)
  p_verify = sub.add_parser("verify", help="check every checkpoint's checksums")
  p_verify.add_argument("workdir")
  p_import = sub.add_parser("import", help="a step-0 checkpoint from an HF checkpoint (no step)")
  p_import.add_argument("hf_dir", help="BERT / XLM-R (*ForMaskedLM, encoder-only or "
                        "sentence-transformers) directory")
  p_import.add_argument("workdir", help="the new workdir")
  p_import.add_argument("--config", default=None, help="config file (as for bepa-train); "
                        "--config.a.b=value overrides follow it")
  args, extra = parser.parse_known_args(argv)
  if args.command == "import":
    return cmd_import(args.hf_dir, args.workdir, args.config, extra)
  if extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")

  import logging
  logging.getLogger("absl").setLevel(logging.ERROR)
  from etils import epath
  from bepa_jax.checkpoint import store as checkpoint
  if not epath.Path(args.workdir).exists():
    return cli.fail(PROG, f"{args.workdir} does not exist")
  if not epath.Path(args.workdir).is_dir():
    return cli.fail(PROG, f"{args.workdir} is a file, not a workdir or checkpoints directory")

  def command():
    ckpt = checkpoint.Checkpointer(args.workdir, read_only=True)
    if args.command == "list":
      return cmd_list(ckpt, out)
    if args.command == "verify":
      return cmd_verify(ckpt, out)
    return cmd_show(ckpt, args.step, out)
  return cli.guarded(PROG, command, errors=(ValueError,))


run = cli.entry(main)


if __name__ == "__main__":
  run()
