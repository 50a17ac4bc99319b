"""Batches from any mixture of pair sources, as a pure function of (seed, step).

Every process computes the same global plan for a step (data/plan.py: the mixture, dedup,
over integers read once per record: data/table.py) and then reads, tokenises (or takes from
the record store, data/store.py) and masks only its own contiguous rows (data/rows.py),
packing them when asked (data/packing.py) into rows that every process derives from the
plan's token counts, so no collective agrees on them. The global batch does not depend on
the number of processes and resuming at step s needs nothing but s (the step is already in
the checkpoint; data/identity.py checks that the data is the same). The arrays are those
data/batch_spec.py describes.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from bepa_jax.data import identity
from bepa_jax.data import table as table_lib
from bepa_jax.data.batch_spec import BatchSpec
from bepa_jax.data.packing import Packer
from bepa_jax.data.plan import PLAN_VERSION, Plan
from bepa_jax.data.records import Component, LoadStats
from bepa_jax.data.rows import RowMaker
from bepa_jax.data.tokenizer import Tokenizer
from bepa_jax.errors import ConfigError, InputError


class PairPipeline:
  """Sentence pairs from language-pair components mixed by weight and temperature.

  The settings are checked by the config's validation pass (config/validate.py) before the
  pipeline is built; only what depends on the data (the sources) is checked here.
  """

  def __init__(self, components: Sequence[Component], weights: Sequence[float],
               tokenizer: Tokenizer, *, global_batch: int, max_length: int, mask_prob: float,
               max_predictions: int, seed: int, temperature: float = 1.0, dedup: bool = True,
               load_stats: LoadStats | None = None, stream_extra: dict | None = None,
               cls_input: str = "masked", mlm_input: str = "sentence", packing: bool = False,
               packed_rows: int = 0, packed_pair_rows: int = 0, batch_shards: int = 1,
               micro_batches: int = 1, table: table_lib.Table | None = None, tokens=None):
    self.counters = collections.Counter()   # replaced duplicates / unusable, truncations
    if table is None and (dedup or packing):  # the plan's integers: one read of every record
      table = table_lib.scan(components, tokenizer if packing else None)
    self.plan = Plan(components, weights, temperature=temperature, global_batch=global_batch,
                     seed=seed, dedup=dedup, counters=self.counters, table=table)
    self.tokens = tokens  # the record store's token ids by text id (data/store.py), or None
    self.tok = tokenizer
    self.global_batch, self.seed = int(global_batch), int(seed)
    self.cls_input, self.mlm_input = cls_input, mlm_input
    self.row_maker = RowMaker(tokenizer, max_length=max_length, mask_prob=mask_prob,
                              max_predictions=max_predictions, seed=seed, cls_input=cls_input,
                              mlm_input=mlm_input, counters=self.counters)
    self.load_stats = load_stats or LoadStats()
    self.stream_extra = dict(stream_extra or {})  # more keys the records depend on (text policy)
    self.start_step = 0  # the train step at which this data stream's position 0 was used
    self.packing = bool(packing)
    self.packer = Packer(global_batch=global_batch, max_length=max_length,
                         pad_id=tokenizer.pad_id, mlm_input=mlm_input, packed_rows=packed_rows,
                         packed_pair_rows=packed_pair_rows, batch_shards=batch_shards,
                         micro_batches=micro_batches, counters=self.counters)
    if self.packing and self.packer.needs_probe:
      self._probe_packing()

  # -------------------------------------------------------------------- the plan
  @property
  def components(self) -> list[Component]:
    return self.plan.components

  @property
  def mlm_only(self) -> bool:
    """Every source is monolingual (MLM-only rows)."""
    return self.plan.mlm_only

  @property
  def probs(self) -> dict[str, float]:
    return self.plan.probs

  @property
  def truncated(self) -> int:
    return self.counters["truncated"]

  def resolve(self, step: int, rows: range | None = None):
    """(component [B], index [B], texts {row: (x, y)}, swap [B]) of the batch at `step`."""
    return self.plan.resolve(int(step) - self.start_step, rows)

  def languages_of(self, step: int) -> list[tuple[str, str]]:
    """(language of x, language of y) of every row of the global batch at `step`."""
    return self.plan.languages(int(step) - self.start_step)

  def texts_of(self, step: int) -> list[tuple[str, str]]:
    """The (x, y) texts of the global batch at `step` (for tests and inspection)."""
    return self.plan.texts(int(step) - self.start_step)

  # -------------------------------------------------------------------- batch
  def batch(self, step: int, process_index: int = 0, process_count: int = 1,
            rows: tuple[int, int] | None = None) -> dict:
    """This process's rows of the global batch at `step` (`spec` describes the arrays): padded
    [b, 2, ...], or packed (data.packing) into `rows` = (sentence rows, pair rows) per group
    (default: the configured or probed rows, or the fallback for a step that some group of the
    global batch does not fit: packing.Packer.agree, the same on every process)."""
    if self.global_batch % process_count:
      raise ConfigError(f"train.global_batch={self.global_batch} is not divisible by "
                        f"{process_count} processes")
    b = self.global_batch // process_count
    local = range(process_index * b, (process_index + 1) * b)
    position = int(step) - self.start_step
    if self.tokens is not None:   # the store holds every text's tokens: none tokenised here
      out, lengths, pair_lengths = self.row_maker.make_ids(
          self.tokens.ids(self.plan.flat_keys(position, local)), position, local.start)
    else:
      out, lengths, pair_lengths = self.row_maker.make(
          self.plan.flat_texts(position, local), position, local.start)
    if not self.packing:
      return out
    if rows is None:   # the same rows on every process, from the global plan's integers
      counts = self.plan.lengths(position)
      self._check_counts(counts[local.start:local.stop], lengths, step)
      rows = self.packer.agree(counts)
    return self.packer.pack(out, lengths, pair_lengths, process_count, rows)

  def _check_counts(self, counts, lengths, step: int) -> None:
    """The token counts the plan agreed on are those of the rows built (else the processes
    could pack into different shapes)."""
    if not np.array_equal(np.minimum(counts, self.row_maker.max_length - 2) + 2, lengths):
      raise InputError(f"step {step}: the tokenizer gives other token counts than it gave for "
                       f"the same texts at start-up (a tokenizer that is not deterministic?)")

  def spec(self, process_count: int = 1, rows: tuple[int, int] | None = None) -> BatchSpec:
    """The layout of one process's batch (`rows`: those asked of a packed batch; default the
    configured or probed rows)."""
    b = self.global_batch // process_count
    maker = self.row_maker
    if not self.packing:
      return BatchSpec(b, maker.max_length, maker.max_predictions, self.cls_input,
                       self.mlm_input)
    groups = self.packer.batch_shards // process_count * self.packer.micro_batches
    return BatchSpec(b, maker.max_length, maker.max_predictions, self.cls_input,
                     self.mlm_input, tuple(self.rows if rows is None else rows), groups)

  # -------------------------------------------------------------------- packing
  @property
  def rows(self) -> tuple[int, int]:
    """(rows per packing group for the sentence passes, for the TLM pair pass or 0)."""
    return self.packer.rows

  @property
  def fallback_rows(self) -> tuple[int, int]:
    """Rows that always fit: one sequence per row (the padded layout's cost)."""
    return self.packer.fallback_rows

  @property
  def packing_probe(self) -> dict | None:
    """What the start-up probe measured (rows chosen from the data), for the log."""
    return self.packer.probe_result

  def _probe_packing(self, min_sentences: int = 4096, max_steps: int = 16):
    """Auto rows (data.packed_rows=0) from the first steps of the stream (packing.Packer.
    choose_rows), from the plan's token counts; it leaves no count behind."""
    steps = max(1, min(max_steps, -(-min_sentences // (2 * self.global_batch))))
    saved = self.counters.copy()
    cut = self.row_maker.max_length - 2
    lengths = [np.minimum(self.plan.lengths(position), cut) for position in range(steps)]
    self.counters.clear()
    self.counters.update(saved)
    self.plan.forget()
    self.packer.choose_rows(lengths)

  def packing_summary(self) -> str:
    """One log line: the packed layout and what it saves."""
    if not self.packing:
      return "packing off (data.packing=False): every sentence padded to data.max_length"
    return self.packer.summary()

  # -------------------------------------------------------------------- identity
  def stream(self) -> dict:
    """Every setting the batch of a step depends on besides the step, by config key."""
    maker = self.row_maker
    return {
        "data.source": [f"{c.name} ({len(c)} pairs)" for c in self.components],
        "data.temperature/weights": [round(float(p), 9) for p in self.plan.mixture.probs],
        "data.seed": self.seed, "train.global_batch": self.global_batch,
        "batch plan version": PLAN_VERSION,   # the redraw rule (data/plan.py)
        "data.max_length": maker.max_length, "data.dedup": self.plan.dedup,
        "data.mask_prob": maker.mask_prob, "data.max_predictions_per_seq": maker.max_predictions,
        "tokenizer": self.tok.fingerprint(), **self.stream_extra,
        # what the batch holds besides the order (listed when not the default)
        **({"loss.cls_input": self.cls_input} if self.cls_input != "masked" else {}),
        **({"loss.mlm_input": self.mlm_input} if self.mlm_input != "sentence" else {}),
        # the packed layout: the same pairs and masks, other dropout draws (listed when on)
        # (config values, 0 = auto: a mesh change, which changes the groups, still resumes)
        **({"data.packing": True, "data.packed_rows": self.packer.rows_config[0],
            "data.packed_pair_rows": self.packer.rows_config[1]} if self.packing else {})}

  def fingerprint(self) -> str:
    """A short hash of `stream()`."""
    return identity.digest(self.stream())

  def state_dict(self, step: int) -> dict:
    """The input position stored in a checkpoint saved after `step` steps."""
    return identity.state_dict(self.stream(), step, self.start_step)

  def verify_state(self, state: dict, *, continue_on_new_data: bool = False) -> list[str]:
    """Checks a checkpoint's data state against this pipeline (identity.verify_state);
    returns the changes it accepted and sets where this stream starts."""
    changes, self.start_step = identity.verify_state(
        self.stream(), state, continue_on_new_data=continue_on_new_data)
    return changes

  def report(self) -> str:
    """One log line: what the readers dropped and what the batches replaced or truncated."""
    total = LoadStats()
    total.add(self.load_stats)
    for c in self.components:
      if c.stats is not None:  # read lazily: what was dropped so far
        total.add(c.stats)
    extra = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(self.counters.items())
                      if v)
    return f"input: {total.report()}" + (f"; {extra}" if extra else "")
