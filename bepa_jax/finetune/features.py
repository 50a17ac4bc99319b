"""Records -> fixed-length model inputs, and span predictions -> answer text.

Pairs are laid out as in BERT / XLM-R fine-tuning:
  bert : [CLS] a [SEP] b [SEP]        token types 0 ... 0 1 ... 1
  xlmr : <s> a </s> </s> b </s>       token types all 0 (one type embedding)
Span extraction uses the question as `a` and a window of the context as `b`. The context is
split into words (whitespace, punctuation and CJK characters apart) that are tokenised one by
one, so every token knows its word and every word its characters: an answer's characters map
to tokens for training, and a predicted token span maps back to the exact context text. Long
contexts are cut into windows `doc_stride` tokens apart; a window without the answer points
both labels at position 0 ([CLS]), as in BERT's SQuAD recipe.
"""
from __future__ import annotations

import unicodedata

import numpy as np

KEYS = ("input_ids", "token_type_ids", "attention_mask")


def _sep(family: str, tok) -> list[int]:
  return [tok.sep_id, tok.sep_id] if family == "xlmr" else [tok.sep_id]


def pack(tok, family: str, a: list[int], b: list[int] | None, max_length: int):
  """-> (ids, types) of one row; the longer side is truncated first."""
  mid = _sep(family, tok)
  budget = max_length - 2 - (len(mid) if b is not None else 0)
  a, b = list(a), (list(b) if b is not None else None)
  while len(a) + (len(b) if b else 0) > budget:
    if b and len(b) >= len(a):
      b.pop()
    else:
      a.pop()
  ids = [tok.cls_id] + a + [tok.sep_id]
  types = [0] * len(ids)
  if b is not None:
    second = (mid[1:] if family == "xlmr" else []) + b + [tok.sep_id]
    ids += second
    types += [0 if family == "xlmr" else 1] * len(second)
  return ids, types


def _rows(rows, max_length: int, pad_id: int) -> dict:
  n = len(rows)
  out = {"input_ids": np.full((n, max_length), pad_id, np.int32),
         "token_type_ids": np.zeros((n, max_length), np.int32),
         "attention_mask": np.zeros((n, max_length), np.int32)}
  for i, (ids, types) in enumerate(rows):
    out["input_ids"][i, :len(ids)] = ids
    out["token_type_ids"][i, :len(types)] = types
    out["attention_mask"][i, :len(ids)] = 1
  return out


def classification_features(records, tok, family: str, max_length: int,
                            label_dtype=np.int32) -> dict:
  """Records {"texts", "label"} -> arrays [N, L] and labels [N] (float32 for regression)."""
  firsts = tok.encode_batch([r["texts"][0] for r in records])
  pairs = [r for r in records if len(r["texts"]) > 1]
  seconds = iter(tok.encode_batch([r["texts"][1] for r in pairs]))
  rows = [pack(tok, family, a, next(seconds) if len(r["texts"]) > 1 else None, max_length)
          for a, r in zip(firsts, records)]
  out = _rows(rows, max_length, tok.pad_id)
  out["labels"] = np.array([r["label"] for r in records], label_dtype)
  return out


# ----------------------------------------------------------------------------- spans
def _is_cjk(c: str) -> bool:
  cp = ord(c)
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0xF900 <= cp <= 0xFAFF or 0x3040 <= cp <= 0x30FF)


def split_words(text: str) -> list[tuple[int, int]]:
  """Character spans [start, end) of the words of `text` (punctuation and CJK stand alone)."""
  spans, start = [], None
  for i, c in enumerate(text):
    alone = _is_cjk(c) or unicodedata.category(c).startswith("P")
    if c.isspace() or alone:
      if start is not None:
        spans.append((start, i))
        start = None
      if alone:
        spans.append((i, i + 1))
    elif start is None:
      start = i
  if start is not None:
    spans.append((start, len(text)))
  return spans


def span_features(records, tok, family: str, max_length: int, doc_stride: int = 128,
                  max_query: int = 64):
  """Records {"question", "context", "answers", "answer_starts"} -> (arrays, windows).

  arrays: input_ids / token_type_ids / attention_mask [W, L], start_positions /
  end_positions [W] (0 = no answer in this window), example [W] (index into records).
  windows: per row, (first context position, token -> word index list, word spans).
  """
  rows, starts, ends, example, windows = [], [], [], [], []
  mid = _sep(family, tok)
  for e, r in enumerate(records):
    q = tok.encode_batch([r["question"]])[0][:max_query]
    words = split_words(r["context"])
    pieces = tok.encode_batch([r["context"][s:t] for s, t in words]) if words else []
    tok_word = [w for w, p in enumerate(pieces) for _ in p]
    ctx = [t for p in pieces for t in p]
    ans = None
    if r.get("answers"):
      a_start = r["answer_starts"][0]
      a_end = a_start + len(r["answers"][0])  # exclusive
      ws = [w for w, (s, t) in enumerate(words) if t > a_start and s < a_end]
      if ws:
        tw = [i for i, w in enumerate(tok_word) if ws[0] <= w <= ws[-1]]
        ans = (tw[0], tw[-1]) if tw else None
    room = max_length - len(q) - 2 - len(mid)
    first = 1 + len(q) + len(mid)
    offset = 0
    while True:
      piece = ctx[offset:offset + room]
      ids, types = pack(tok, family, q, piece, max_length)
      s = t = 0
      if ans is not None and offset <= ans[0] and ans[1] < offset + len(piece):
        s, t = first + ans[0] - offset, first + ans[1] - offset
      rows.append((ids, types))
      starts.append(s)
      ends.append(t)
      example.append(e)
      windows.append((first, tok_word[offset:offset + len(piece)], words))
      if offset + room >= len(ctx):
        break
      offset += min(doc_stride, room)
  out = _rows(rows, max_length, tok.pad_id)
  out["start_positions"] = np.array(starts, np.int32)
  out["end_positions"] = np.array(ends, np.int32)
  out["example"] = np.array(example, np.int64)
  return out, windows


def best_spans(start_logits, end_logits, windows, example, records, n_best: int = 20,
               max_answer_tokens: int = 30) -> list[str]:
  """The highest-scoring (start + end) context span of each record, over all its windows."""
  best = [(-np.inf, "") for _ in records]
  for w, (first, tok_word, words) in enumerate(windows):
    n = len(tok_word)
    if n == 0:
      continue
    s_log = np.asarray(start_logits[w, first:first + n], np.float64)
    e_log = np.asarray(end_logits[w, first:first + n], np.float64)
    k = min(n_best, n)
    for i in np.argsort(-s_log)[:k]:
      for j in np.argsort(-e_log)[:k]:
        if j < i or j - i + 1 > max_answer_tokens:
          continue
        score = s_log[i] + e_log[j]
        e = int(example[w])
        if score > best[e][0]:
          ctx = records[e]["context"]
          best[e] = (score, ctx[words[tok_word[i]][0]:words[tok_word[j]][1]])
  return [text for _, text in best]
