"""Batches from any mixture of pair sources, as a pure function of (seed, step).

Every process computes the same global plan for a step and
then tokenises and masks only its own contiguous rows, so the global batch does not depend
on the number of processes and resuming at step s needs nothing but s (the step is already
in the checkpoint).

Duplicates: two pairs of one batch sharing a sentence on either side, or a meaning (a row of
a multi-way source such as the embedded corpus, in two language pairs), are false negatives
for InfoNCE. With `dedup` on, each process reads the *texts* of the whole global batch
(cheap: B record reads, no tokenisation), and a row whose sentence already occurred -- or
whose record is unusable (empty, too long, not UTF-8) -- is redrawn from the same component
with a seed of (step, row, attempt). With `dedup` off a process reads only its own rows.

Masking is vectorised over a process's rows; its random numbers come from one Philox stream
per step jumped to the process's first row, so they too are independent of the process count.
"""
from __future__ import annotations

import collections
import zlib
from typing import Sequence

import numpy as np

from bepa_jax.data import packing
from bepa_jax.data.masking import mask_batch
from bepa_jax.data.mixture import Mixture
from bepa_jax.data.records import Component, LoadStats
from bepa_jax.data.tokenizer import Tokenizer
from bepa_jax.errors import ConfigError, InputError

MAX_ATTEMPTS = 64
CLS_INPUTS = ("masked", "clean")   # loss.cls_input: what the contrastive [CLS] pass sees
MLM_INPUTS = ("sentence", "pair")  # loss.mlm_input: each side alone, or [CLS] x [SEP] [CLS] y [SEP]


def _digest(stream: dict) -> str:
  import hashlib
  import json
  return hashlib.sha1(json.dumps(stream, sort_keys=True).encode()).hexdigest()[:16]


class PairPipeline:
  """Sentence pairs from language-pair components mixed by weight and temperature."""

  def __init__(self, components: Sequence[Component], weights: Sequence[float],
               tokenizer: Tokenizer, *, global_batch: int, max_length: int, mask_prob: float,
               max_predictions: int, seed: int, temperature: float = 1.0, dedup: bool = True,
               load_stats: LoadStats | None = None, stream_extra: dict | None = None,
               cls_input: str = "masked", mlm_input: str = "sentence", packing: bool = False,
               packed_rows: int = 0, packed_pair_rows: int = 0, batch_shards: int = 1,
               micro_batches: int = 1):
    if not components:
      raise ConfigError("data.source yields no language pairs")
    mono = [bool(getattr(c, "monolingual", False)) for c in components]
    if any(mono) and not all(mono):
      raise ConfigError("data.source mixes mono: with parallel sources: MLM-only rows would "
                        "be negatives of the contrastive loss; use them alone with loss.weight=0")
    self.mlm_only = all(mono)
    self.components = list(components)
    self.tok = tokenizer
    self.global_batch = int(global_batch)
    self.max_length = int(max_length)
    self.mask_prob = float(mask_prob)
    self.max_predictions = int(max_predictions)
    self.seed = int(seed)
    self.dedup = bool(dedup)
    self.load_stats = load_stats or LoadStats()
    if cls_input not in CLS_INPUTS or mlm_input not in MLM_INPUTS:
      raise ConfigError(f"loss.cls_input={cls_input!r} / loss.mlm_input={mlm_input!r}: "
                        f"expected one of {CLS_INPUTS} / {MLM_INPUTS}")
    if mlm_input == "pair" and cls_input != "clean":
      raise ConfigError("loss.mlm_input=pair needs loss.cls_input=clean (the [CLS] of a pair "
                        "sequence is not a sentence embedding)")
    self.cls_input, self.mlm_input = cls_input, mlm_input
    self.mixture = Mixture([len(c) for c in components], weights, temperature, global_batch,
                           seed)
    self.counters = collections.Counter()   # replaced duplicates / unusable, truncations
    self._resolved = None
    self.stream_extra = dict(stream_extra or {})  # more keys the records depend on (text policy)
    self.start_step = 0  # the train step at which this data stream's position 0 was used
    # packing (bepa_jax/data/packing.py): groups of one shard's share of one micro-batch
    self.packing = bool(packing)
    self.batch_shards, self.micro_batches = int(batch_shards), int(micro_batches)
    self.packed_rows, self.packed_pair_rows = int(packed_rows), int(packed_pair_rows)
    self.rows_config = (self.packed_rows, self.packed_pair_rows)  # as configured (0 = auto)
    self.packing_probe = None   # what the start-up probe measured (auto rows), for the log
    if self.packing:
      groups = self.batch_shards * self.micro_batches
      if self.global_batch % groups:
        raise ConfigError(f"data.packing: train.global_batch={self.global_batch} is not "
                          f"divisible by {self.batch_shards} batch shards x "
                          f"{self.micro_batches} micro-batches")
      self.group_pairs = self.global_batch // groups
      for key, rows, most in (("data.packed_rows", self.packed_rows, 2 * self.group_pairs),
                              ("data.packed_pair_rows", self.packed_pair_rows,
                               self.group_pairs)):
        if rows > most:
          raise ConfigError(f"{key}={rows} exceeds the {most} sequences of a packing group "
                            f"({self.group_pairs} pairs): one per row is the padded layout")
      if not self.packed_rows or (mlm_input == "pair" and not self.packed_pair_rows):
        self._probe_packing()

  # -------------------------------------------------------------------- plan
  @property
  def truncated(self) -> int:
    return self.counters["truncated"]

  @property
  def probs(self) -> dict[str, float]:
    return {c.name: float(p) for c, p in zip(self.components, self.mixture.probs)}

  def _redraw(self, step, row, c, attempt):
    rng = np.random.default_rng([self.seed, 13, int(step), int(row), attempt])
    return int(rng.integers(len(self.components[c])))

  def resolve(self, step: int, rows: range | None = None):
    """(component [B], index [B], texts {row: (x, y)}) after replacing bad/duplicate rows.

    With dedup every row of the global batch is resolved (in global order); otherwise only
    `rows`, each on its own, which gives the same result for those rows.
    """
    key = (int(step), None if self.dedup else (rows.start, rows.stop) if rows else None)
    if self._resolved and self._resolved[0] == key:
      return self._resolved[1]
    step = int(step) - self.start_step  # this stream's position
    comps, idx = self.mixture.plan(step)
    todo = range(self.global_batch) if self.dedup or rows is None else rows
    seen, groups, texts = set(), set(), {}
    for r in todo:
      c = int(comps[r])
      for attempt in range(MAX_ATTEMPTS):
        pair = self.components[c][int(idx[r])]
        group = self.components[c].group(int(idx[r]))
        if pair is None:
          self.counters["unusable_replaced"] += 1
        elif self.dedup and (pair[0] in seen or pair[1] in seen or group in groups):
          self.counters["duplicates_replaced"] += 1
        else:
          break
        idx[r] = self._redraw(step, r, c, attempt)
      else:
        raise InputError(f"{self.components[c].name}: no usable, non-duplicate pair found for "
                         f"row {r} of step {step} after {MAX_ATTEMPTS} draws (component too "
                         f"small for train.global_batch={self.global_batch}, or mostly bad "
                         f"records; data.dedup=False allows duplicates)")
      if self.dedup:
        seen.update(pair)
        if group is not None:
          groups.add(group)
      texts[r] = pair
    # a random side order per row: the languages of x and y are balanced
    swap = np.random.default_rng([self.seed, 14, int(step)]).random(self.global_batch) < 0.5
    if self.mlm_only:
      swap[:] = False
    out = (comps, idx, texts, swap)
    self._resolved = (key, out)
    return out

  def languages_of(self, step: int) -> list[tuple[str, str]]:
    comps, _, _, swap = self.resolve(step)
    out = []
    for c, s in zip(comps, swap):
      lx, ly = self.components[c].lang_x, self.components[c].lang_y
      out.append((ly, lx) if s else (lx, ly))
    return out

  def texts_of(self, step: int) -> list[tuple[str, str]]:
    """The (x, y) texts of the global batch at `step` (for tests and inspection)."""
    _, _, texts, swap = self.resolve(step)
    return [(texts[r][1], texts[r][0]) if swap[r] else texts[r]
            for r in range(self.global_batch)]

  # -------------------------------------------------------------------- batch
  def batch(self, step: int, process_index: int = 0, process_count: int = 1,
            rows: tuple[int, int] | None = None) -> dict:
    """This process's rows of the global batch at `step`: numpy arrays [b, 2, ...], or packed
    (data.packing) into `rows` = (sentence rows, pair rows) per group (default: the configured
    or probed rows; a step that does not fit takes the fallback, see `pack_batch`)."""
    out, lengths, pair_lengths = self._padded_batch(step, process_index, process_count)
    if not self.packing:
      return out
    return self.pack_batch(out, lengths, pair_lengths, process_count, rows)

  def _padded_batch(self, step: int, process_index: int, process_count: int):
    """(batch [b, 2, ...] padded to max_length, sentence lengths [b, 2] with [CLS]/[SEP],
    pair-sequence lengths [b] or None)."""
    if self.global_batch % process_count:
      raise ConfigError(f"train.global_batch={self.global_batch} is not divisible by "
                        f"{process_count} processes")
    b = self.global_batch // process_count
    rows = range(process_index * b, (process_index + 1) * b)
    _, _, texts, swap = self.resolve(step, rows)
    flat = []
    for r in rows:
      x, y = texts[r]
      flat += [y, x] if swap[r] else [x, y]
    ids = self.tok.encode_batch(flat)
    L, P, tok = self.max_length, self.max_predictions, self.tok
    seq = np.full((2 * b, L), tok.pad_id, np.int32)
    n = np.zeros(2 * b, np.int64)
    hashes = np.zeros(2 * b, np.int32)
    for k, t in enumerate(ids):
      if len(t) > L - 2:
        self.counters["truncated"] += 1
      t = np.asarray(t[:L - 2], np.int32)
      seq[k, 1:len(t) + 1] = t
      n[k] = len(t)
      # crc32 of each side's tokens before masking: lets
      # loss.mask_duplicates drop candidates repeating the positive's text
      hashes[k] = np.int64(zlib.crc32(t.tobytes())).astype(np.int32)
    seq[:, 0] = tok.cls_id
    seq[np.arange(2 * b), n + 1] = tok.sep_id
    u = self._uniforms(step, rows.start, b)
    shape = lambda a: a.reshape((b, 2) + a.shape[1:])
    out = {"token_type_ids": np.zeros((b, 2, L), np.int32),
           "attention_mask": shape((np.arange(L)[None] < (n + 2)[:, None]).astype(np.int32)),
           "text_hash": shape(hashes)}
    lengths = shape(n + 2)
    if self.mlm_input == "pair":
      out["input_ids"] = shape(seq)
      pair_mlm, pair_lengths = self._pair_mlm(ids, u.reshape(b, -1))
      out.update(pair_mlm)
      return out, lengths, pair_lengths
    masked, pos, lab, w = mask_batch(
        seq, n, u.reshape(2 * b, -1), mask_prob=self.mask_prob, max_predictions=P,
        mask_id=tok.mask_id, vocab_size=tok.vocab_size,
        random_token_low=max(tok.special_ids) + 1)
    if self.cls_input == "clean":  # [CLS] from the clean sentence, MLM on its own pass
      out["input_ids"], out["mlm_input_ids"] = shape(seq), shape(masked)
    else:
      out["input_ids"] = shape(masked)
    out.update(mlm_positions=shape(pos), mlm_ids=shape(lab), mlm_weights=shape(w))
    return out, lengths, None

  def _pair_mlm(self, ids: list, u: np.ndarray) -> dict:
    """TLM (XLM; the authors' `bilingual` MLM): one `[CLS] x [SEP] [CLS] y [SEP]` sequence per
    pair, each side cut to (max_length - 4) // 2 tokens, positions running on across both
    halves, masked jointly (2 * max_predictions positions over both sides).

    -> ({mlm_input_ids, mlm_attention_mask [b, L]; mlm_positions, mlm_ids, mlm_weights
    [b, 2P]}, sequence lengths [b]).
    """
    L, tok = self.max_length, self.tok
    half = (L - 4) // 2
    b = len(ids) // 2
    seq = np.full((b, L), tok.pad_id, np.int32)
    maskable = np.zeros((b, L), bool)
    total = np.zeros(b, np.int64)
    for r in range(b):
      x, y = ids[2 * r][:half], ids[2 * r + 1][:half]
      if len(ids[2 * r]) > half or len(ids[2 * r + 1]) > half:
        self.counters["pair_side_truncated"] += 1
      nx, ny = len(x), len(y)
      seq[r, :nx + ny + 4] = [tok.cls_id, *x, tok.sep_id, tok.cls_id, *y, tok.sep_id]
      maskable[r, 1:nx + 1] = True
      maskable[r, nx + 3:nx + ny + 3] = True
      total[r] = nx + ny + 4
    masked, pos, lab, w = mask_batch(
        seq, maskable.sum(1), u, mask_prob=self.mask_prob, max_predictions=2 * self.max_predictions,
        mask_id=tok.mask_id, vocab_size=tok.vocab_size,
        random_token_low=max(tok.special_ids) + 1, maskable=maskable)
    return {"mlm_input_ids": masked,
            "mlm_attention_mask": (np.arange(L)[None] < total[:, None]).astype(np.int32),
            "mlm_positions": pos, "mlm_ids": lab, "mlm_weights": w}, total

  # -------------------------------------------------------------------- packing
  @property
  def rows(self) -> tuple[int, int]:
    """(rows per packing group for the sentence passes, for the TLM pair pass or 0)."""
    pair = self.packed_pair_rows if self.mlm_input == "pair" else 0
    return self.packed_rows, pair

  @property
  def fallback_rows(self) -> tuple[int, int]:
    """Rows that always fit: one sequence per row (the padded layout's cost)."""
    return 2 * self.group_pairs, self.group_pairs if self.mlm_input == "pair" else 0

  def pack_batch(self, out: dict, lengths: np.ndarray, pair_lengths, process_count: int = 1,
                 rows: tuple[int, int] | None = None) -> dict:
    """The padded batch `out` packed group by group (bepa_jax/data/packing.py).

    A step whose sentences do not fit the rows of some group is never cut: the whole step
    (every group of this process) is packed into `fallback_rows`, one sequence per row, which
    always fits; it is counted (`packing fallback steps` in the report). With several processes
    the train loop makes every process take the same rows (the largest any process needs).
    """
    b = lengths.shape[0]
    if self.batch_shards % process_count:
      raise ConfigError(f"data.packing: the {self.batch_shards} batch shards do not split over "
                        f"{process_count} processes")
    groups = packing.pairs_by_group(b, self.batch_shards // process_count, self.micro_batches)
    G, g = groups.shape
    L, tok = self.max_length, self.tok
    want = self.rows if rows is None else rows
    by_group = lambda a: a[groups].reshape((G, 2 * g) + a.shape[2:])
    seq_keys = ["input_ids"] + (["mlm_input_ids"] if "mlm_input_ids" in out and
                                self.mlm_input == "sentence" else [])
    seqs = [by_group(out[k]) for k in seq_keys]
    packed = packing.pack(seqs, by_group(lengths), L, want[0], tok.pad_id)
    pair = None
    if self.mlm_input == "pair":
      pair = packing.pack([out["mlm_input_ids"][groups]], pair_lengths[groups], L, want[1],
                          tok.pad_id)
    if packed is None or (self.mlm_input == "pair" and pair is None):
      if rows is not None and tuple(rows) == self.fallback_rows:
        raise AssertionError("the fallback layout always fits")  # one sequence per row
      self.counters["packing_fallback_steps"] += 1
      return self.pack_batch(out, lengths, pair_lengths, process_count, self.fallback_rows)
    arrays, segment_ids, start = packed
    res = {k: a for k, a in zip(seq_keys, arrays)}
    res["token_type_ids"] = np.zeros_like(segment_ids)
    res["segment_ids"] = segment_ids
    res["attention_mask"] = (segment_ids > 0).astype(np.int32)
    cls_index = np.zeros((b, 2), np.int32)
    cls_index[groups.reshape(-1)] = start.reshape(G * g, 2)
    res["cls_index"] = cls_index
    if pair is None:  # MLM positions of each sentence, in its group's grid
      res["mlm_positions"] = (cls_index[..., None] + out["mlm_positions"]).astype(np.int32)
    else:
      (pair_ids,), pair_segments, pair_start = pair
      pair_first = np.zeros(b, np.int64)
      pair_first[groups.reshape(-1)] = pair_start.reshape(-1)
      res.update(mlm_input_ids=pair_ids, mlm_segment_ids=pair_segments,
                 mlm_attention_mask=(pair_segments > 0).astype(np.int32),
                 mlm_positions=(pair_first[:, None] + out["mlm_positions"]).astype(np.int32))
    for k in ("mlm_ids", "mlm_weights", "text_hash"):
      res[k] = out[k]
    return res

  def _probe_packing(self, min_sentences: int = 4096, max_steps: int = 16):
    """Auto rows (data.packed_rows=0): the most rows any group of the first steps of the
    stream needs (a later step needing more takes the counted fallback). Deterministic: a
    function of the data and the config, the same on every process (the probe reads the
    global batch)."""
    steps = max(1, min(max_steps, -(-min_sentences // (2 * self.global_batch))))
    counters = self.counters.copy()
    groups = packing.pairs_by_group(self.global_batch, self.batch_shards, self.micro_batches)
    L, half = self.max_length, (self.max_length - 4) // 2
    need, need_pair, real = [], [], 0
    for step in range(self.start_step, self.start_step + steps):
      flat = [t for x, y in self.texts_of(step) for t in (x, y)]
      n = np.array([min(len(t), L - 2) for t in self.tok.encode_batch(flat)]).reshape(-1, 2)
      real += int((n + 2).sum())
      need += list(packing.rows_needed((n + 2)[groups].reshape(len(groups), -1), L))
      pair = np.minimum(n, half).sum(1) + 4
      need_pair += list(packing.rows_needed(pair[groups], L))
    self.counters = counters
    self._resolved = None
    most, most_pair = self.fallback_rows
    if not self.packed_rows:
      self.packed_rows = min(most, max(need))
    if self.mlm_input == "pair" and not self.packed_pair_rows:
      self.packed_pair_rows = min(most_pair, max(need_pair))
    self.packing_probe = {
        "steps": steps, "groups": len(need), "sentences_per_group": 2 * self.group_pairs,
        "mean_tokens_per_sentence": real / (2 * self.global_batch * steps),
        "rows_needed_max": int(max(need)), "rows_needed_mean": float(np.mean(need)),
        **({"pair_rows_needed_max": int(max(need_pair))} if self.mlm_input == "pair" else {})}

  def packing_summary(self) -> str:
    """One log line: the packed layout and what it saves."""
    if not self.packing:
      return "packing off (data.packing=False): every sentence padded to data.max_length"
    R, R2 = self.rows
    G = self.batch_shards * self.micro_batches
    line = (f"packing: {G} groups of {self.group_pairs} pairs, each {2 * self.group_pairs} "
            f"sentences in {R} rows of {self.max_length} tokens")
    if R2:
      line += f", TLM pair sequences in {R2} rows"
    line += f" ({2 * self.group_pairs / R:.1f}x fewer rows than padded)"
    p = self.packing_probe
    if p:
      line += (f"; rows chosen from {p['groups']} groups of the first {p['steps']} steps: "
               f"{p['mean_tokens_per_sentence']:.1f} tokens per sentence, rows needed "
               f"mean {p['rows_needed_mean']:.1f} max {p['rows_needed_max']}")
    return line

  def _uniforms(self, step: int, first_row: int, count: int) -> np.ndarray:
    """[count, 2, D] uniforms of global rows first_row.. at `step`; D = L + 2P (padded to 4).

    One counter-based (Philox) stream per step, jumped to the first row: a row's numbers
    do not depend on which process draws them, and a process draws only its own rows.
    """
    step = int(step) - self.start_step
    L, P = self.max_length, self.max_predictions
    d = -(-(L + 2 * P) // 2) * 2        # 2 sides x d doubles per row: a multiple of 4
    key = np.random.SeedSequence([self.seed, 2, int(step)]).generate_state(2, np.uint64)
    bitgen = np.random.Philox(key=key)
    bitgen.advance(first_row * 2 * d // 4)    # Philox counts blocks of 4 doubles
    return np.random.Generator(bitgen).random((count, 2, d))

  def stream(self) -> dict:
    """Every setting the batch of a step depends on besides the step, by config key."""
    return {
        "data.source": [f"{c.name} ({len(c)} pairs)" for c in self.components],
        "data.temperature/weights": [round(float(p), 9) for p in self.mixture.probs],
        "data.seed": self.seed, "train.global_batch": self.global_batch,
        "data.max_length": self.max_length, "data.dedup": self.dedup,
        "data.mask_prob": self.mask_prob, "data.max_predictions_per_seq": self.max_predictions,
        "tokenizer": self.tok.fingerprint(), **self.stream_extra,
        # what the batch holds besides the order (listed when not the default)
        **({"loss.cls_input": self.cls_input} if self.cls_input != "masked" else {}),
        **({"loss.mlm_input": self.mlm_input} if self.mlm_input != "sentence" else {}),
        # the packed layout: the same pairs and masks, other dropout draws (listed when on)
        # (config values, 0 = auto: a mesh change, which changes the groups, still resumes)
        **({"data.packing": True, "data.packed_rows": self.rows_config[0],
            "data.packed_pair_rows": self.rows_config[1]} if self.packing else {})}

  def fingerprint(self) -> str:
    """A short hash of `stream()`."""
    return _digest(self.stream())

  def state_dict(self, step: int) -> dict:
    """The position saved in a checkpoint: the step (a pure function), where this data stream
    started (`continue_on_new_data`), and what the stream depends on."""
    stream = self.stream()
    return {"next_step": int(step), "start_step": self.start_step,
            "data_fingerprint": _digest(stream), "stream": stream}

  def verify_state(self, state: dict, *, continue_on_new_data: bool = False) -> list[str]:
    """Checks a checkpoint's data state against this pipeline; returns the changes.

    A change (other sources, seed, batch, lengths, masking or tokenizer) stops with one line
    naming the keys: the batches after the saved step would differ silently. With
    `continue_on_new_data` the change is accepted and this stream starts at its position 0
    at the saved step (kept in later checkpoints, so a second resume continues it).
    """
    step = int(state.get("next_step", 0))
    now, saved = self.stream(), state.get("stream")
    if saved is not None:
      keys = sorted(set(now) | set(saved))
      changes = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys
                 if saved.get(k) != now.get(k)]
    elif state.get("data_fingerprint") not in (None, self.fingerprint()):
      changes = [f"data fingerprint {state['data_fingerprint']} -> {self.fingerprint()}"]
    else:
      changes = []
    if not changes:
      self.start_step = int(state.get("start_step", 0))
    elif continue_on_new_data:
      self.start_step = step
    else:
      raise ConfigError(
          f"the checkpoint at step {step} was trained on other data ({'; '.join(changes)}): "
          f"resume with the saved values, use a new --workdir, or set "
          f"data.continue_on_new_data=True to train on this data from its start")
    return changes

  def report(self) -> str:
    """One log line: what the readers dropped and what the batches replaced or truncated."""
    live = LoadStats()
    for c in self.components:
      if hasattr(c, "stats"):
        live.add(c.stats)
    total = LoadStats()
    total.add(self.load_stats)
    total.add(live)
    extra = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(self.counters.items())
                      if v)
    return f"input: {total.report()}" + (f"; {extra}" if extra else "")
