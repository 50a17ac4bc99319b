"""One run per workdir: an advisory lock that process 0 of a run holds while it trains.

Two `bepa-train` commands on one workdir would delete each other's in-progress saves and
write into the same checkpoints/ and metrics.jsonl. The lock is `WORKDIR/.bepa.lock`, held
with flock(2) (the OS drops it when its holder dies, even on SIGKILL) and naming its holder
(host, pid, start time, command) for the message a second run prints. A lock file left by a
process that no longer holds it is stale: it is taken over with one warning line.
Remote workdirs (gs://...) have no flock: they are not locked, and the log says so.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

from bepa_jax.errors import BepaError

LOCK_NAME = ".bepa.lock"
log = logging.getLogger("bepa")


class WorkdirBusy(BepaError):
  """The workdir is in use by another run."""


def _describe(holder: dict) -> str:
  started = holder.get("started")
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {since} "
          f"({holder.get('command', '?')})")


def _read(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


class WorkdirLock:
  """`with WorkdirLock(workdir):` -- raises WorkdirBusy (naming the holder) if another run
  holds it; nothing in the workdir is touched then."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._file = None

  def acquire(self) -> "WorkdirLock":
    if "://" in self.workdir:
      log.info("%s: a remote workdir is not locked: run one bepa-train on it at a time",
               self.workdir)
      return self
    import fcntl
    os.makedirs(self.workdir, exist_ok=True)
    f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 -- held until release()
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.close()
      raise WorkdirBusy(f"--workdir {self.workdir} is in use by another run: "
                        f"{_describe(_read(self.path))}; wait for it to finish or use another "
                        f"workdir (nothing was changed)") from None
    previous = _read(self.path)
    if previous:  # a holder that left without releasing (killed): its lock died with it
      log.warning("%s: taking over the stale lock of %s (that process no longer holds it)",
                  self.path, _describe(previous))
    f.seek(0)
    f.truncate()
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
               "command": " ".join(os.path.basename(a) if i == 0 else a
                                   for i, a in enumerate(sys.argv))[:300]}, f)
    f.flush()
    self._file = f
    return self

  def release(self) -> None:
    if self._file is None:
      return
    import fcntl
    try:
      self._file.seek(0)
      self._file.truncate()  # an empty file: released cleanly, not stale
      self._file.flush()
      fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
    finally:
      self._file.close()
      self._file = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
