"""Checksums of a saved checkpoint's files: a flipped bit or a cut file is found, not restored.

Orbax renames a step's directory into place only when its save is complete, which catches an
interrupted save but not bytes changed afterwards (a bad disk, a partial copy between buckets,
an edit). So once a save has finished, `write` stores the size and SHA-256 of every file of
the step in `<step>/checksums.json`; `verify` recomputes them before anything reads the step
(training's restore, bepa-eval, bepa-export, bepa-ckpt). Its cost is one sequential read of
the checkpoint (bench/checkpoint_verify.py measures it; docs/checkpoints.md states the figure).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from etils import epath

FILE = "checksums.json"
ALGORITHM = "sha256"
CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class Verdict:
  """ok: every file matches. problem: why not (None when ok). checked: False = no checksums."""
  ok: bool
  problem: str | None = None
  checked: bool = True
  bytes_read: int = 0


def _files(step_dir: epath.Path, prefix: str = ""):
  """(relative path, Path) of every file under step_dir, sorted, checksums.json excluded."""
  for p in sorted(step_dir.iterdir(), key=lambda p: p.name):
    rel = f"{prefix}{p.name}"
    if p.is_dir():
      yield from _files(p, rel + "/")
    elif rel != FILE:
      yield rel, p


def _digest(path: epath.Path) -> tuple[int, str]:
  h, n = hashlib.new(ALGORITHM), 0
  with path.open("rb") as f:
    while chunk := f.read(CHUNK):
      h.update(chunk)
      n += len(chunk)
  return n, h.hexdigest()


def write(step_dir) -> int:
  """Writes <step_dir>/checksums.json (atomically: a temporary name, then a rename); returns
  the bytes hashed."""
  step_dir = epath.Path(step_dir)
  files = {rel: list(_digest(p)) for rel, p in _files(step_dir)}
  tmp = step_dir / (FILE + ".tmp")
  tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": files,
                             "digest": _self_digest(files)}, indent=0))
  tmp.rename(step_dir / FILE)
  return sum(size for size, _ in files.values())


def _self_digest(files: dict) -> str:
  """The hash of the list itself: a flip inside checksums.json blames checksums.json."""
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def has_checksums(step_dir) -> bool:
  return (epath.Path(step_dir) / FILE).exists()


def verify(step_dir) -> Verdict:
  """Checks every file listed in checksums.json (missing, other size, other bytes)."""
  step_dir = epath.Path(step_dir)
  path = step_dir / FILE
  if not step_dir.is_dir():
    return Verdict(False, f"{step_dir} is not a directory")
  if not path.exists():
    return Verdict(True, "no checksums.json (saved by an older version, or the run stopped "
                   "before they were written): not verified", checked=False)
  try:
    saved = json.loads(path.read_text())
    files = {str(k): (int(v[0]), str(v[1])) for k, v in saved["files"].items()}
    if saved.get("algorithm") != ALGORITHM:
      raise ValueError(f"algorithm {saved.get('algorithm')!r}")
    if saved.get("digest") != _self_digest(saved["files"]):
      raise ValueError("its own digest does not match")
  except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
    return Verdict(False, f"{FILE} is damaged ({type(e).__name__}: {e})")
  present = dict(_files(step_dir))
  read = 0
  for rel, (size, digest) in sorted(files.items()):
    if rel not in present:
      return Verdict(False, f"{rel} is missing", bytes_read=read)
    got_size = present[rel].stat().length
    if got_size != size:
      return Verdict(False, f"{rel} has {got_size} bytes, {size} were saved (truncated or "
                     f"changed)", bytes_read=read)
    n, got = _digest(present[rel])
    read += n
    if got != digest:
      return Verdict(False, f"{rel} does not match its checksum (bytes changed since the save)",
                     bytes_read=read)
  return Verdict(True, bytes_read=read)
