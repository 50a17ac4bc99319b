"""The bundled multilingual parallel corpus (bepa_jax/resources/parallel_corpus.tsv)."""
from __future__ import annotations

import dataclasses
import os

RESOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources",
                        "parallel_corpus.tsv")


@dataclasses.dataclass(frozen=True)
class MultiwayCorpus:
  """Rows of one meaning in several languages: rows[i][j] is meaning i in languages[j]."""
  languages: tuple[str, ...]
  rows: tuple[tuple[str, ...], ...]

  def __len__(self):
    return len(self.rows)

  def select(self, languages) -> "MultiwayCorpus":
    missing = [l for l in languages if l not in self.languages]
    if missing:
      raise ValueError(f"languages {missing} not in corpus (has {', '.join(self.languages)})")
    cols = [self.languages.index(l) for l in languages]
    return MultiwayCorpus(tuple(languages), tuple(tuple(r[c] for c in cols) for r in self.rows))

  def texts(self):
    for row in self.rows:
      yield from row


def read_multiway_tsv(path: str) -> MultiwayCorpus:
  """A TSV whose header names the languages; each line holds one meaning in each of them."""
  with open(path, encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
    rows = []
    for lineno, line in enumerate(f, start=2):
      fields = line.rstrip("\n").split("\t")
      if len(fields) != len(header):
        raise ValueError(f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                         f"({', '.join(header)}), got {len(fields)}")
      rows.append(tuple(fields))
  return MultiwayCorpus(tuple(header), tuple(rows))


def load_embedded() -> MultiwayCorpus:
  return read_multiway_tsv(RESOURCE)
