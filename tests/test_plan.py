"""The global plan over integers (data/plan.py, data/table.py) and the packer's vectorised
first-fit (data/packing.py): each equals a slow reference of the same rule on small inputs;
dedup holds over the whole global batch; nothing depends on the process count."""
import collections

import numpy as np
import pytest

from bepa_jax.data import packing, table as table_lib
from bepa_jax.data.plan import MAX_ATTEMPTS, Plan
from bepa_jax.data.records import Component
from bepa_jax.errors import InputError


class Listed(Component):
  """Pairs from lists; None = an unusable record; `meanings` = a multi-way row number."""

  def __init__(self, name, pairs, meanings=None):
    self.source, self.lang_x, self.lang_y = "listed", name, "y"
    self.pairs, self.meanings = pairs, meanings

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, i):
    return self.pairs[i]

  def group(self, i):
    return None if self.meanings is None else ("listed", self.meanings[i])


def _components(seed, n=(40, 24, 12), words=40, bad=0.1):
  """Small components full of repeated sentences, shared meanings and unusable records."""
  rng = np.random.default_rng(seed)
  out = []
  for c, size in enumerate(n):
    pairs = [None if rng.random() < bad else (f"w{rng.integers(words)}", f"v{rng.integers(words)}")
             for _ in range(size)]
    out.append(Listed(f"l{c}", pairs, rng.integers(0, 60, size).tolist() if c < 2 else None))
  return out


def _reference(plan, position):
  """The rule of data/plan.py's docstring, row by row in Python."""
  comps, idx = plan.mixture.plan(position)
  t, held, todo = plan.table, set(), list(range(plan.global_batch))

  def keys(r):
    f = int(t.offsets[comps[r]] + idx[r])
    out = {("text", int(t.keys[f, 0])), ("text", int(t.keys[f, 1]))}
    if t.meanings is not None and t.meanings[f] >= 0:
      out.add(("meaning", int(t.meanings[f])))
    return out

  for attempt in range(MAX_ATTEMPTS):
    if attempt:
      draw = np.random.default_rng([plan.seed, 13, position, attempt]).integers(
          0, plan.sizes[comps])
      for r in todo:
        idx[r] = draw[r]
    live = [r for r in todo if t.keys[t.offsets[comps[r]] + idx[r], 0] >= 0
            and not (plan.dedup and keys(r) & held)]
    first = {}
    for r in live:
      for k in keys(r):
        first.setdefault(k, r)
    won = [r for r in live if not plan.dedup or all(first[k] == r for k in keys(r))]
    for r in won:
      held |= keys(r)
    todo = [r for r in todo if r not in won]
    if not todo:
      return comps, idx
  raise InputError("too few pairs")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dedup", [True, False])
def test_vectorised_plan_equals_the_reference(seed, dedup):
  comps = _components(seed)
  table = table_lib.scan(comps)
  plan = Plan(comps, [1.0, 2.0, 1.0], temperature=1.0, global_batch=8, seed=seed, dedup=dedup,
              counters=collections.Counter(), table=table)
  for position in range(12):
    c, i, texts, _ = plan.resolve(position)
    rc, ri = _reference(plan, position)
    np.testing.assert_array_equal(c, rc)
    np.testing.assert_array_equal(i, ri, err_msg=f"position {position}")
    assert all(texts[r] is not None for r in range(8))          # unusable: always redrawn
    if dedup:   # no sentence (either side) or meaning twice in the global batch
      flat = table.flat(c, i)
      held = [k for r, f in enumerate(flat) for k in set(table.keys[f].tolist())]
      assert len(held) == len(set(held))
      m = table.meanings[flat]
      assert len(m[m >= 0]) == len(set(m[m >= 0].tolist()))
  assert plan.counters["unusable_replaced"] > 0
  assert (plan.counters["duplicates_replaced"] > 0) == dedup


def test_plan_reads_no_text_and_any_rows_give_the_same_plan():
  """With a table the plan is integers only: resolving the batch reads no record; a host's
  rows are the same whichever rows it asks for, and rows read lazily (no table: dedup off,
  no packing) give the same records."""
  comps = _components(3)
  table = table_lib.scan(comps)
  reads = collections.Counter()
  for c in comps:
    c.__class__ = type("Counted", (Listed,), {
        "__getitem__": lambda self, i: reads.update([1]) or Listed.__getitem__(self, i)})
  kw = dict(temperature=1.0, global_batch=8, seed=1, counters=collections.Counter())
  whole = Plan(comps, [1.0] * 3, dedup=True, table=table, **kw)
  c, i, texts, _ = whole.resolve(5)
  assert sum(reads.values()) == 0
  assert texts[2] == comps[c[2]][i[2]] and sum(reads.values()) == 2   # read on access only
  lazy = Plan(comps, [1.0] * 3, dedup=False, **kw)
  eager = Plan(comps, [1.0] * 3, dedup=False, table=table, **kw)
  for rows in (range(0, 4), range(4, 8)):
    lc, li, _, _ = lazy.resolve(5, rows)
    ec, ei, _, _ = eager.resolve(5, rows)
    np.testing.assert_array_equal(li[rows.start:rows.stop], ei[rows.start:rows.stop])


def test_a_component_too_small_for_the_batch_is_one_line():
  comps = [Listed("x", [(f"a{i}", f"b{i % 3}") for i in range(20)])]   # 3 distinct y sides
  plan = Plan(comps, [1.0], temperature=1.0, global_batch=4, seed=0, dedup=True,
              counters=collections.Counter())
  with pytest.raises(InputError, match=r"listed:x-y: .* after 64 draws .*data.dedup=False"):
    plan.resolve(0)


def test_text_keys_are_content_hashes():
  """The same on every host and run (Python's hash() is salted per process)."""
  assert table_lib.text_key("Guten Morgen") == 0x5255d1f9e3869875
  assert table_lib.text_key("Guten Morgen") != table_lib.text_key("Guten Morgen.")


def _pack_reference(seqs, lengths, capacity, rows, pad_id):
  """The packer before vectorisation: first_fit group by group, item by item."""
  G, n = lengths.shape
  L = seqs[0].shape[-1]
  out = [np.full((G, rows, L), pad_id, s.dtype) for s in seqs]
  segment_ids, start = np.zeros((G, rows, L), np.int32), np.zeros((G, n), np.int64)
  for gi in range(G):
    row, offset, used = packing.first_fit(lengths[gi], capacity)
    if used > rows:
      return None
    count = np.zeros(rows, np.int32)
    for i in range(n):
      r, o, m = int(row[i]), int(offset[i]), int(lengths[gi, i])
      for dst, src in zip(out, seqs):
        dst[gi, r, o:o + m] = src[gi, i, :m]
      count[r] += 1
      segment_ids[gi, r, o:o + m] = count[r]
      start[gi, i] = r * L + o
  return out, segment_ids, start


def test_vectorised_first_fit_and_pack_equal_the_reference():
  rng = np.random.default_rng(0)
  for _ in range(40):
    G, n, L = int(rng.integers(1, 5)), int(rng.integers(1, 14)), int(rng.integers(8, 33))
    lengths = rng.integers(2, L + 1, (G, n))
    row, offset, used = packing.first_fit_groups(lengths, L)
    for g in range(G):
      r, o, u = packing.first_fit(lengths[g], L)
      np.testing.assert_array_equal(row[g], r)
      np.testing.assert_array_equal(offset[g], o)
      assert used[g] == u
    np.testing.assert_array_equal(packing.rows_needed(lengths, L), used)
    seqs = [rng.integers(5, 99, (G, n, L)).astype(np.int32) for _ in range(2)]
    for rows in range(1, n + 2):
      got, want = packing.pack(seqs, lengths, L, rows, 0), _pack_reference(seqs, lengths, L,
                                                                           rows, 0)
      assert (got is None) == (want is None)
      assert (packing.first_fit_groups(lengths, L, rows)[2].max() <= rows) == (got is not None)
      need = np.minimum(used, rows + 1)
      np.testing.assert_array_equal(packing.rows_needed(lengths, L, rows), need)
      if got is not None:
        for a, b in zip(got[0] + [got[1], got[2]], want[0] + [want[1], want[2]]):
          np.testing.assert_array_equal(a, b)


def test_agreed_rows_are_those_every_process_would_need():
  """Packer.agree decides from the global token counts what an all-gather of every process's
  own decision gave before: the configured rows if all groups fit, else the fallback."""
  rng = np.random.default_rng(1)
  B, L, shards = 32, 32, 8
  for R in (1, 2, 3):
    packer = packing.Packer(global_batch=B, max_length=L, pad_id=0, mlm_input="sentence",
                            packed_rows=R, packed_pair_rows=0, batch_shards=shards,
                            micro_batches=1, counters=collections.Counter())
    for _ in range(20):
      counts = rng.integers(1, 20, (B, 2))
      agreed = packer.agree(counts)
      for P in (1, 2, 4):
        local = B // P
        need = [packing.rows_needed(
            (np.minimum(counts[p * local:(p + 1) * local], L - 2) + 2)[
                packer.local_groups(local, P)].reshape(shards // P, -1), L).max()
                for p in range(P)]
        assert agreed == ((R, 0) if max(need) <= R else packer.fallback_rows)
