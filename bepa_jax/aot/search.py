"""`bepa-compile --search`: the fastest plan that fits, not the first.

A plan is one setting of the knobs that change memory and speed but not the model or the
loss: remat policy, how the state is split (data parallel, ZeRO-1 optimizer sharding, fsdp,
a tensor axis), the MLM loss streamed over vocabulary chunks, the contrastive loss streamed
over column chunks, scanned or unrolled layers, dropout's PRNG, GradCache as the last resort.
`run` walks a pruned grid of them, the caller compiling each (a child process per compile),
and ranks the plans that fit by step time:

  1. memory: per remat level, lightest first, every combination of sharding and chunking the
     shape warrants (chunking only where the dense buffers are large: the MLM logits at a
     vocabulary >= 64k or >= 1/16 of HBM per chip, the contrastive logits >= 1/32), fsdp only
     when no data-parallel plan fits at that level; a combination that needs no more memory
     than one that did not fit is skipped; the first level where anything fits is the last.
     Nothing fits: GradCache chunks (4, then 16) at remat=full on the most frugal split.
  2. speed: the fastest plan that fits, with its layers unrolled (or scanned), with fsdp (the
     gradients reduce-scattered, each chip's share of the state: the fixed per-chip costs that
     data parallelism does not shrink), over a tensor axis of 2 and 4 at <= 32 pairs per chip
     (a quarter of the weights read for 4x the rows), with the other dropout PRNG (when there
     is dropout), and with the next heavier remat: in the compiled roofline less saved
     activations can mean less HBM traffic (xlm-roberta-base, B = 4096 on
     v5e-64: 267 ms with remat=full, 347 with dots_saveable). A compiler crash is retried with
     unrolled layers, then rbg dropout (see Search.attempt).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

from bepa_jax.aot.report import human_bytes
from bepa_jax.config import validate as config_lib
from bepa_jax.errors import ConfigError, one_line

SHARDINGS = ("zero1", "data", "fsdp")    # most to least data-parallel speed, as a prior
MEMORY_RANK = {"data": 0, "zero1": 1, "fsdp": 2}  # higher: less state per chip
VOCAB_CHUNK = 16384                      # loss.mlm_vocab_chunk tried (bench/step.py: XLM-R)
LARGE_VOCAB = 65536
CONTRASTIVE_CHUNK = 1024
GRADCACHE = (4, 16)
TENSOR = (2, 4)                          # mesh.tensor tried by the speed stage ...
SMALL_SHARE = 32                         # ... at this many pairs per chip or fewer
THREEFRY, RBG = "threefry2x32", "rbg"
CRASHED = ("crash", "rc -11")            # XLA:TPU died of a signal


@dataclasses.dataclass(frozen=True)
class Plan:
  remat: str
  sharding: str = "data"                 # data | zero1 (mesh.shard_optimizer) | fsdp
  mlm_vocab_chunk: int = 0
  contrastive_chunk: int = 0
  scan_layers: bool = True
  dropout_rng: str = THREEFRY
  gradcache_chunks: int = 0
  tensor: int = 1                        # mesh.tensor: heads, MLP and vocabulary split

  def settings(self, dcn_data: int = 1) -> dict:
    """config key -> value."""
    data, fsdp = (dcn_data, -1) if self.sharding == "fsdp" else (-1, 1)
    return {"model.remat": self.remat, "mesh.data": data, "mesh.fsdp": fsdp,
            "mesh.tensor": self.tensor,
            "mesh.shard_optimizer": self.sharding == "zero1",
            "loss.mlm_vocab_chunk": self.mlm_vocab_chunk,
            "loss.contrastive_chunk": self.contrastive_chunk,
            "model.scan_layers": self.scan_layers, "train.dropout_rng": self.dropout_rng,
            "train.gradcache_chunks": self.gradcache_chunks}

  def overrides(self, dcn_data: int = 1, config=None) -> list[str]:
    """--config.KEY=VALUE for every setting (only those that differ from `config`'s)."""
    return [f"--config.{k}={v}" for k, v in self.settings(dcn_data).items()
            if config is None or str(config_lib.get(config, k)) != str(v)]

  @property
  def key(self) -> str:
    """A file-name-safe name: remat.sharding.mcN.ccN.scan|unrolled.rng[.gcN][.tpN]."""
    return ".".join([self.remat, self.sharding, f"mc{self.mlm_vocab_chunk}",
                     f"cc{self.contrastive_chunk}", "scan" if self.scan_layers else "unrolled",
                     "rbg" if self.dropout_rng == RBG else self.dropout_rng]
                    + ([f"gc{self.gradcache_chunks}"] if self.gradcache_chunks else [])
                    + ([f"tp{self.tensor}"] if self.tensor > 1 else []))

  @classmethod
  def from_key(cls, key: str) -> "Plan":
    """The plan of a `key`."""
    parts = key.split(".")
    tp = int(parts.pop()[2:]) if parts[-1].startswith("tp") else 1
    gc = int(parts.pop()[2:]) if parts[-1].startswith("gc") else 0
    remat, sharding, mc, cc, layers, rng = parts
    return cls(remat, sharding, int(mc[2:]), int(cc[2:]), layers == "scan", rng, gc, tp)

  def describe(self) -> str:
    parts = [f"remat={self.remat}", {"data": "data parallel", "zero1": "ZeRO-1",
                                     "fsdp": "fsdp"}[self.sharding]]
    if self.mlm_vocab_chunk:
      parts.append(f"MLM vocab chunk {self.mlm_vocab_chunk}")
    if self.contrastive_chunk:
      parts.append(f"contrastive chunk {self.contrastive_chunk}")
    parts.append("scanned" if self.scan_layers else "unrolled")
    parts.append("rbg dropout" if self.dropout_rng == RBG else "threefry dropout")
    if self.gradcache_chunks:
      parts.append(f"GradCache {self.gradcache_chunks}")
    if self.tensor > 1:
      parts.append(f"tensor {self.tensor}")
    return ", ".join(parts)

  def saves_at_least(self, other: "Plan") -> bool:
    """Whether this plan needs no more memory than `other` (same remat and layers)."""
    return (MEMORY_RANK[self.sharding] >= MEMORY_RANK[other.sharding]
            and bool(self.mlm_vocab_chunk) >= bool(other.mlm_vocab_chunk)
            and bool(self.contrastive_chunk) >= bool(other.contrastive_chunk)
            and (self.remat, self.scan_layers, self.dropout_rng, self.gradcache_chunks,
                 self.tensor)
            == (other.remat, other.scan_layers, other.dropout_rng, other.gradcache_chunks,
                other.tensor))


def plan_config(config, plan: Plan):
  """A copy of `config` with `plan`'s settings."""
  c = config.copy_and_resolve_references()
  for k, v in plan.settings(int(config.mesh.dcn_data)).items():
    section, name = k.split(".")
    c[section][name] = v
  return c


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the grid is pruned by: chips, HBM per chip, vocabulary, and the config's own choices."""
  chips: int
  hbm_bytes: float
  vocab: int
  batch: int
  predictions: int            # MLM slots per sentence (data.max_predictions_per_seq)
  candidates: int             # contrastive columns (B, or 2B with same-language negatives)
  dropout: bool               # any dropout: the PRNG matters
  remat: str
  scan_layers: bool
  dropout_rng: str
  mlm_vocab_chunk: int
  contrastive_chunk: int

  @classmethod
  def of(cls, config, chips: int, hbm_bytes: float, vocab: int) -> "Shape":
    m, B = config.model, int(config.train.global_batch)
    return cls(chips=chips, hbm_bytes=hbm_bytes, vocab=vocab, batch=B,
               predictions=int(config.data.max_predictions_per_seq),
               candidates=2 * B if bool(config.loss.same_language_negatives) else B,
               dropout=float(m.hidden_dropout) > 0 or float(m.attention_dropout) > 0,
               remat=str(m.remat), scan_layers=bool(m.scan_layers),
               dropout_rng=str(config.train.dropout_rng),
               mlm_vocab_chunk=int(config.loss.mlm_vocab_chunk),
               contrastive_chunk=int(config.loss.contrastive_chunk))

  def vocab_chunks(self) -> tuple[int, ...]:
    chunk = self.mlm_vocab_chunk or VOCAB_CHUNK
    logits = 2 * (self.batch / self.chips) * self.predictions * self.vocab * 4
    if self.vocab > chunk and (self.vocab >= LARGE_VOCAB or logits >= self.hbm_bytes / 16):
      return (chunk, 0)
    return (self.mlm_vocab_chunk,)

  def contrastive_chunks(self) -> tuple[int, ...]:
    logits = 4 * (self.batch / self.chips) * self.candidates * 4  # both directions + grads
    chunk = self.contrastive_chunk or math.gcd(CONTRASTIVE_CHUNK, self.candidates)
    if chunk < self.candidates and logits >= self.hbm_bytes / 32:
      return (chunk, 0)
    return (self.contrastive_chunk,)

  def remats(self) -> tuple[str, ...]:
    return (("none",) if self.remat == "none" else ()) + ("dots_saveable", "full")

  def combos(self, fsdp: bool) -> list[Plan]:
    """The memory stage's plans of one remat level (dots_saveable), fsdp or not."""
    shardings = [s for s in SHARDINGS if (s == "fsdp") == fsdp] if self.chips > 1 else (
        [] if fsdp else ["data"])
    return [Plan("dots_saveable", s, vc, cc, self.scan_layers, self.dropout_rng)
            for s, vc, cc in itertools.product(shardings, self.vocab_chunks(),
                                               self.contrastive_chunks())]


def summary(rep: dict | None) -> dict:
  """The figures of one compile's report that the ranking shows."""
  if rep is None:
    return dict(status="not compiled (budget)", fits=False)
  if rep.get("failed"):
    return dict(status=f"failed: {rep['failed']}", fits=False,
                error=str(rep.get("error", rep.get("tail", "")))[:300])
  m = rep["memory"]
  out = dict(status="fits" if m["fits"] else "does not fit", fits=bool(m["fits"]),
             gib_per_chip=m["total"] / 2 ** 30, hbm_gib=m["hbm"] / 2 ** 30)
  if m["fits"] or "time" in rep:
    out.update(step_ms=rep["time"]["step_s"] * 1e3, pairs_per_s=rep["pairs_per_s"],
               mfu=rep.get("mfu"), hfu=rep.get("hfu"), bound=rep["time"]["bound"])
  return out


class Search:
  """One search: `compile_fn(plan)` returns the plan's report (or {"failed": ...}, or None
  when it will not compile it now); every plan met is kept in `tried`, in order."""

  def __init__(self, config, shape: Shape, compile_fn: Callable, log: Callable = print):
    self.config, self.shape, self.compile_fn, self.log = config, shape, compile_fn, log
    self.tried: dict[str, dict] = {}

  def seed(self, plan: Plan, rep: dict) -> None:
    """A plan compiled before (its report): met again, it is not compiled again."""
    self.tried[plan.key] = dict(plan=plan, rep=rep, **summary(rep))

  def attempt(self, plan: Plan) -> dict:
    """The plan's row, compiled if new. XLA:TPU's crash (threefry dropout in scanned layers,
    bepa_jax/aot/libtpu.py) comes with the shape, so likely with every plan: once seen, a scanned
    threefry plan is not compiled but replaced, as a crashed one is, by its first way out
    that compiles: unrolled layers (cheaper: rbg's masks go through HBM), then rbg dropout."""
    doomed = (self.shape.dropout and plan.scan_layers and plan.dropout_rng == THREEFRY
              and plan.key not in self.tried and any(
                  r["plan"].scan_layers and r["plan"].dropout_rng == THREEFRY
                  and (r.get("rep") or {}).get("failed") in CRASHED
                  for r in self.tried.values()))
    if doomed:
      row = self.tried[plan.key] = dict(plan=plan, fits=False, status="skipped: scanned "
                                        "layers with threefry dropout crashed XLA:TPU here")
    else:
      row = self.tried.get(plan.key) or self._compile(plan)
    if not (doomed or (row.get("rep") or {}).get("failed") in CRASHED) or not self.shape.dropout:
      return row
    ways_out = ([dataclasses.replace(plan, scan_layers=False)] if plan.scan_layers else []) + (
        [dataclasses.replace(plan, dropout_rng=RBG)] if plan.dropout_rng != RBG else [])
    for alt in ways_out:  # the first that compiled (one not compiled now: the next)
      alt_row = self.attempt(alt)
      if alt_row.get("rep") and alt_row["rep"].get("failed") not in CRASHED:
        return alt_row
    return row

  def _compile(self, plan: Plan) -> dict:
    try:
      config_lib.validate(plan_config(self.config, plan), self.shape.chips)
    except ConfigError as e:
      row = dict(plan=plan, status=f"invalid: {one_line(e)}", fits=False)
    else:
      self.log(f"[{len(self.tried) + 1}] {plan.describe()} ...")
      rep = self.compile_fn(plan)
      row = dict(plan=plan, rep=rep, **summary(rep))
    self.tried[plan.key] = row
    return row

  def memory_stage(self) -> list[dict]:
    for remat in self.shape.remats():
      fit = []
      for fsdp in (False, True):
        for plan in self.shape.combos(fsdp):
          plan = dataclasses.replace(plan, remat=remat)
          too_big = [r["plan"] for r in self.tried.values()
                     if r["status"] == "does not fit" and r["plan"].saves_at_least(plan)]
          if too_big:
            self.tried.setdefault(plan.key, dict(
                plan=plan, fits=False, status=f"skipped: needs at least the memory of "
                f"{too_big[0].describe()}, which does not fit"))
            continue
          fit += [r for r in [self.attempt(plan)] if r["fits"]]
        if fit:
          return fit
    frugal = max(self.shape.combos(False) + self.shape.combos(True),
                 key=lambda p: (MEMORY_RANK[p.sharding], bool(p.mlm_vocab_chunk),
                                bool(p.contrastive_chunk)))
    for gc in GRADCACHE:
      row = self.attempt(dataclasses.replace(frugal, remat="full", gradcache_chunks=gc))
      if row["fits"]:
        return [row]
    return []

  def speed_stage(self) -> None:
    """The fastest plan's variants, the likeliest gain first: rbg dropout (a crash's way out)
    back to threefry with the layers flipped, the layers flipped, fsdp, heavier remat, the
    PRNG."""
    best = self.ranked()[0]["plan"]
    flip = dataclasses.replace(best, scan_layers=not best.scan_layers)
    variants = [dataclasses.replace(flip, dropout_rng=THREEFRY)] if (
        self.shape.dropout and best.dropout_rng == RBG) else []
    variants.append(flip)
    if best.sharding != "fsdp" and self.shape.chips > 1 and not best.gradcache_chunks:
      variants.append(dataclasses.replace(best, sharding="fsdp"))
    if (self.shape.batch <= SMALL_SHARE * self.shape.chips and best.tensor == 1
        and not best.gradcache_chunks):  # a small share: the per-chip fixed costs dominate
      variants += [dataclasses.replace(best, tensor=t) for t in TENSOR
                   if self.shape.chips % t == 0]
    remats = self.shape.remats()
    heavier = remats[remats.index(best.remat) + 1:] if best.remat in remats else ()
    if heavier and not best.gradcache_chunks:
      variants.append(dataclasses.replace(best, remat=heavier[0]))
    if self.shape.dropout:
      variants.append(dataclasses.replace(
          best, dropout_rng=THREEFRY if best.dropout_rng == RBG else RBG))
    for plan in variants:
      self.attempt(plan)

  def ranked(self) -> list[dict]:
    fits = [r for r in self.tried.values() if r["fits"]]
    return sorted(fits, key=lambda r: r["step_ms"])

  def run(self) -> dict:
    if self.memory_stage():
      self.speed_stage()
    return self.result()

  def result(self) -> dict:
    ranked = self.ranked()
    dcn = int(self.config.mesh.dcn_data)
    rows = [dict({k: v for k, v in r.items() if k not in ("plan", "rep")},
                 key=r["plan"].key, plan=dataclasses.asdict(r["plan"]),
                 describe=r["plan"].describe(), overrides=r["plan"].overrides(dcn))
            for r in self.tried.values()]
    best = ranked[0]["plan"] if ranked else None
    return dict(plans=rows, ranked=[r["plan"].key for r in ranked],
                best=best.key if best else None,
                best_overrides=best.overrides(dcn, self.config) if best else None,
                compiles=sum("rep" in r and r["rep"] is not None for r in self.tried.values()))


def format_result(result: dict, where: str) -> str:
  """The ranked plans that fit, then the others, then the best plan's overrides."""
  rows = {r["key"]: r for r in result["plans"]}
  lines = [f"plans for {where} that fit, fastest first ({result['compiles']} compiled; step "
           f"time from each compiled step's roofline):",
           "  rank  step ms     pairs/s    MFU    HFU   memory/chip  plan"]
  for i, key in enumerate(result["ranked"], 1):
    r = rows[key]
    pct = lambda x: "    ?" if x is None else f"{x:6.1%}"
    lines.append(f"  {i:4d} {r['step_ms']:8.2f} {r['pairs_per_s']:11,.0f} {pct(r['mfu'])} "
                 f"{pct(r['hfu'])} {human_bytes(r['gib_per_chip'] * 2 ** 30):>10s}/"
                 f"{r['hbm_gib']:.0f}G  {r['describe']}")
  if not result["ranked"]:
    lines.append("  (none)")
  others = [r for r in result["plans"] if not r["fits"]]
  if others:
    lines.append("did not fit, failed or not compiled:")
    for r in others:
      size = f" ({r['gib_per_chip']:.2f} GiB)" if "gib_per_chip" in r else ""
      lines.append(f"  {r['describe']}: {r['status']}{size}")
  if result["best"]:
    flags = " ".join(result["best_overrides"]) or "(none: the config's own settings)"
    lines += ["", f"best plan: {rows[result['best']]['describe']}",
              f"  bepa-train overrides: {flags}"]
  lines.append("MFU: model FLOPs of the real tokens (what MaxText and levanter publish); HFU: "
               "XLA's flops (remat recompute, padding and element-wise work included)")
  return "\n".join(lines)


def nothing_fits(result: dict, where: str) -> str:
  """One line: no plan fits, and the closest one."""
  sized = [r for r in result["plans"] if "gib_per_chip" in r]
  closest = min(sized, key=lambda r: r["gib_per_chip"]) if sized else None
  tail = (f"; the smallest, {closest['describe']}, needs {closest['gib_per_chip']:.2f} of "
          f"{closest['hbm_gib']:.0f} GiB" if closest else "")
  return (f"no plan fits on {where} ({result['compiles']} compiled{tail}): try a smaller "
          f"--config.train.global_batch or a larger slice")
