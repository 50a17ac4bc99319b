#!/usr/bin/env python3
"""Run a multi-process JAX job on this machine (CPU devices), for testing.

    python launch/local.py --num_processes 2 --devices_per_process 2 -- \
        python -m bepa_jax.cli.train --config configs/quickstart.py --workdir runs/local

Starts ``--num_processes`` copies of the command, each with

    BEPA_COORDINATOR_ADDRESS=127.0.0.1:PORT  BEPA_NUM_PROCESSES=N  BEPA_PROCESS_ID=K
    JAX_PLATFORMS=cpu  XLA_FLAGS=--xla_force_host_platform_device_count=M

which ``bepa_jax.distributed.initialize()`` picks up. Each worker's combined
stdout/stderr goes to ``LOG_DIR/worker_K.log``; worker 0's is also streamed to
the console. As soon as one worker exits non-zero, the others get a short grace
period, then their process groups are killed, the failing worker and the tail of
its log are printed, and the launcher exits non-zero.

Stopping: SIGTERM or SIGHUP to the launcher (a scheduler's preemption, a closed
terminal) is forwarded as SIGTERM to every worker's process group; bepa-train
takes it as a preemption notice, saves a checkpoint at the end of the step and
exits. Whatever is still running ``--stop_timeout_s`` later is SIGKILLed, and the
launcher exits 128+signal (143 for SIGTERM, 129 for SIGHUP). Ctrl-C, and
``--timeout_s`` running out, stop the workers the same way (exit 130, 124).
On every exit path the launcher can catch, each worker's whole process group
(its children too) is gone by the time it returns: no worker outlives it.
The signal handlers are installed only when ``run_local`` runs in the main
thread, and the previous ones are restored when it returns.

Importable: ``from launch.local import run_local``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Mapping, Sequence, TextIO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1", port: int = 0) -> int:
  """A TCP port free a moment ago on ``host`` (``port``, or any); a taken one: ValueError."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is free
    try:
      sock.bind((host, port))
    except OSError as e:
      raise ValueError(f"coordinator port {host}:{port} is in use ({e.strerror}): pick another "
                       f"with --port, or leave --port out for a free one") from None
    return sock.getsockname()[1]


def _xla_flags(existing: str | None, devices_per_process: int) -> str:
  """Existing XLA_FLAGS with the host device count replaced by ours."""
  kept = [f for f in shlex.split(existing or "") if not f.startswith(_DEVICE_COUNT_FLAG)]
  kept.append(f"{_DEVICE_COUNT_FLAG}={devices_per_process}")
  return " ".join(kept)


def worker_env(
  process_id: int,
  num_processes: int,
  devices_per_process: int,
  port: int,
  base: Mapping[str, str] | None = None,
  extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
  """The environment of worker ``process_id``."""
  env = dict(os.environ if base is None else base)
  if extra:
    env.update(extra)
  env.update(
    BEPA_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    BEPA_NUM_PROCESSES=str(num_processes),
    BEPA_PROCESS_ID=str(process_id),
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=_xla_flags(env.get("XLA_FLAGS"), devices_per_process),
    PYTHONUNBUFFERED="1",
  )
  # Let `python -m bepa_jax...` work from a checkout without installing it.
  path = env.get("PYTHONPATH", "")
  if REPO_ROOT not in path.split(os.pathsep):
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
  return env


def _tail(path: str, n: int) -> list[str]:
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(0, size - 64 * 1024))
      data = f.read()
  except OSError:
    return []
  return data.decode("utf-8", "replace").splitlines()[-n:]


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
  try:
    os.killpg(proc.pid, sig)  # each worker leads its own session / group
  except (ProcessLookupError, PermissionError):
    pass


def _kill_groups(procs: list[subprocess.Popen]) -> None:
  """SIGKILL every worker's group, also of workers that exited: their children must go."""
  for p in procs:
    _kill_group(p, signal.SIGKILL)
  for p in procs:
    if p.poll() is None:
      p.wait()


def _tee(pipe, log_file, stream: TextIO) -> None:
  """Copy worker 0's output to its log file and to the console."""
  for chunk in iter(lambda: pipe.read1(65536), b""):
    try:
      log_file.write(chunk)
      log_file.flush()
    except ValueError:  # log closed by the launcher while exiting
      break
    try:
      stream.write(chunk.decode("utf-8", "replace"))
      stream.flush()
    except (ValueError, OSError):  # console closed: keep logging
      pass
  pipe.close()


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _StopRequest:
  """The first stop signal that arrived; set by the handler, acted on by the poll loop."""

  def __init__(self) -> None:
    self.signum: int | None = None

  def __call__(self, signum: int, frame) -> None:
    if self.signum is None:
      self.signum = signum


def _install_handlers(handler: _StopRequest) -> dict[int, object]:
  """Catch SIGTERM/SIGHUP; the previous handlers, or {} outside the main thread."""
  if threading.current_thread() is not threading.main_thread():
    return {}  # Python only lets the main thread install handlers
  previous = {}
  try:
    for sig in STOP_SIGNALS:
      previous[sig] = signal.signal(sig, handler)
  except ValueError:  # not the main interpreter
    _restore_handlers(previous)
    return {}
  return previous


def _restore_handlers(previous: dict[int, object]) -> None:
  for sig, old in previous.items():
    if old is not None:  # None: installed from C, cannot be put back from Python
      signal.signal(sig, old)


def _check(command: Sequence[str], num_processes: int, devices_per_process: int,
           stop_timeout_s: float) -> None:
  if not command:
    raise ValueError("no command to run")
  if shutil.which(command[0]) is None and not os.path.isfile(command[0]):
    raise FileNotFoundError(
      f"command not found: {command[0]} (is the project installed in "
      f"this environment? `pip install -e .`)"
    )
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if devices_per_process < 1:
    raise ValueError(f"devices_per_process must be >= 1, got {devices_per_process}")
  if stop_timeout_s < 0:
    raise ValueError(f"stop_timeout_s must be >= 0, got {stop_timeout_s}")


class _Workers:
  """The workers of one run_local call: their processes, log files, worker 0's tee thread and
  the console lines about them."""

  def __init__(self, command, num_processes, devices_per_process, port, log_dir, env, stream,
               cwd, stop_timeout_s):
    self.command, self.num_processes = list(command), num_processes
    self.devices_per_process, self.port, self.log_dir = devices_per_process, port, log_dir
    self.env, self.stream, self.cwd, self.stop_timeout_s = env, stream, cwd, stop_timeout_s
    self.procs: list[subprocess.Popen] = []
    self.logs: list[str] = []
    self.files = []
    self.tee_thread = None
    self.stopping = False

  def say(self, msg: str) -> None:
    try:
      self.stream.write(f"[local] {msg}\n")
      self.stream.flush()
    except (ValueError, OSError):  # console gone (SIGHUP): keep stopping the workers
      pass

  def start(self, k: int) -> None:
    """Worker k, in its own session; worker 0's output is teed to the console."""
    path = os.path.join(self.log_dir, f"worker_{k}.log")
    log_file = open(path, "wb")
    self.files.append(log_file)
    self.logs.append(path)
    proc = subprocess.Popen(
      self.command,
      env=worker_env(k, self.num_processes, self.devices_per_process, self.port, extra=self.env),
      stdin=subprocess.DEVNULL,
      stdout=subprocess.PIPE if k == 0 else log_file,
      stderr=subprocess.STDOUT,
      start_new_session=True,
      cwd=self.cwd,
    )
    self.procs.append(proc)
    if k == 0:
      self.tee_thread = threading.Thread(
        target=_tee, args=(proc.stdout, log_file, self.stream), daemon=True
      )
      self.tee_thread.start()

  def stop_all(self) -> None:
    """SIGTERM, wait up to ``stop_timeout_s``, SIGKILL; say which way it ended."""
    self.stopping = True
    killed, waited, codes = _stop(self.procs, self.stop_timeout_s)
    codes = ", ".join(str(c) for c in codes)
    if killed:
      self.say(
        f"killed worker(s) {', '.join(map(str, killed))} with SIGKILL, still running "
        f"{waited:.1f}s after SIGTERM (exit codes: {codes})"
      )
    else:
      self.say(f"all workers exited {waited:.1f}s after SIGTERM (exit codes: {codes})")

  def supervise(self, stop: _StopRequest, grace_s: float, timeout_s: float | None,
                tail_lines: int) -> int:
    """Poll until every worker exited, one failed (+ ``grace_s``), a stop signal or the
    timeout; -> run_local's exit code."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed: int | None = None
    while True:
      if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        self.say(
          f"got {name}, stopping all workers (SIGTERM to each process group, "
          f"SIGKILL after {self.stop_timeout_s:g}s)"
        )
        self.stop_all()
        _join(self.tee_thread)
        return 128 + stop.signum
      codes = [p.poll() for p in self.procs]
      if failed is None:
        failed = next((k for k, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None:
          kill_at = time.monotonic() + grace_s
      if all(c is not None for c in codes):
        break
      if failed is not None and time.monotonic() >= kill_at:
        break
      if deadline is not None and time.monotonic() >= deadline:
        self.say(f"timeout after {timeout_s:g}s, stopping all workers")
        self.stop_all()
        _join(self.tee_thread)
        return 124
      time.sleep(0.05)
    if failed is None:
      _kill_groups(self.procs)  # children left behind; they would also hold worker 0's pipe open
      _join(self.tee_thread)
      self.say("all workers finished successfully")
      return 0
    return self.report_failure(failed, tail_lines)

  def report_failure(self, failed: int, tail_lines: int) -> int:
    """Stop the others, print the failed worker's exit code and the tail of its log."""
    procs = self.procs
    still_running = [k for k, p in enumerate(procs) if p.poll() is None]
    _stop(procs, 5.0)
    _join(self.tee_thread)
    code = _exit_code(procs[failed].returncode)
    lines = [
      f"worker {failed} failed with exit code {procs[failed].returncode}"
      + (f"; killed worker(s) {', '.join(map(str, still_running))}" if still_running else ""),
      f"last {tail_lines} lines of {self.logs[failed]}:",
    ]
    lines += ["  | " + line for line in _tail(self.logs[failed], tail_lines)]
    self.say("\n".join(lines))
    return code or 1

  def close(self) -> None:
    _kill_groups(self.procs)
    for f in self.files:
      f.close()


def run_local(
  command: Sequence[str],
  num_processes: int = 2,
  devices_per_process: int = 1,
  port: int | None = None,
  log_dir: str | None = None,
  env: Mapping[str, str] | None = None,
  grace_s: float = 3.0,
  timeout_s: float | None = None,
  tail_lines: int = 20,
  stream: TextIO | None = None,
  cwd: str | None = None,
  stop_timeout_s: float = 60.0,
) -> int:
  """Run ``command`` as ``num_processes`` local workers; return the exit code.

  0 when every worker exits 0; otherwise the first failing worker's exit code
  (128+signal for a signal, 1 if that would be 0), 124 when ``timeout_s``
  passes first, 130 on Ctrl-C, 128+signal on SIGTERM/SIGHUP to this process.
  When stopped, workers get SIGTERM and ``stop_timeout_s`` to exit (to save a
  checkpoint) before SIGKILL. ``env`` adds variables to every worker's environment.
  """
  _check(command, num_processes, devices_per_process, stop_timeout_s)
  stream = sys.stdout if stream is None else stream
  port = free_port(port=port or 0)  # a given port checked before any worker starts
  log_dir = log_dir or tempfile.mkdtemp(prefix="bepa-local-")
  os.makedirs(log_dir, exist_ok=True)
  workers = _Workers(command, num_processes, devices_per_process, port, log_dir, env, stream,
                     cwd, stop_timeout_s)
  workers.say(
    f"{num_processes} worker(s) x {devices_per_process} CPU device(s), coordinator "
    f"127.0.0.1:{port}, logs in {log_dir}: {shlex.join(command)}"
  )
  stop = _StopRequest()
  previous_handlers = {}
  try:
    # Before the first worker starts: a SIGTERM from now on is ours to forward.
    previous_handlers = _install_handlers(stop)
    for k in range(num_processes):
      if stop.signum is not None:
        break
      workers.start(k)
    return workers.supervise(stop, grace_s, timeout_s, tail_lines)
  except KeyboardInterrupt:
    if workers.stopping:  # Ctrl-C while waiting for the workers: do not wait again
      workers.say("interrupted while stopping, killing all workers")
      return 130  # the finally below SIGKILLs every group
    workers.say("interrupted, stopping all workers")
    workers.stop_all()
    return 130
  finally:
    workers.close()
    _restore_handlers(previous_handlers)  # last: a SIGTERM until here still stops workers


def _stop(procs: list[subprocess.Popen], wait_s: float) -> tuple[list[int], float, list]:
  """SIGTERM every worker's process group, SIGKILL what is left after ``wait_s``.

  Returns the workers that had to be killed, the seconds waited and the exit codes.
  """
  start = time.monotonic()
  for p in procs:
    _kill_group(p, signal.SIGTERM)
  end = start + wait_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  waited = time.monotonic() - start
  killed = [k for k, p in enumerate(procs) if p.poll() is None]
  for p in procs:
    _kill_group(p, signal.SIGKILL)  # stragglers, and children of exited workers
    if p.poll() is None:
      p.wait()
  return killed, waited, [p.returncode for p in procs]


def _join(thread: threading.Thread | None) -> None:
  if thread is not None:
    thread.join(timeout=5)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="launch/local.py",
    description="Run N local CPU processes of a JAX program: ... [options] -- COMMAND ...",
  )
  parser.add_argument("--num_processes", "--num-processes", type=int, default=2)
  parser.add_argument("--devices_per_process", "--devices-per-process", type=int, default=1)
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port (default: a free one)")
  parser.add_argument("--log_dir", "--log-dir", default=None, help="default: a new temp dir")
  parser.add_argument("--grace_s", "--grace-s", type=float, default=3.0,
                      help="seconds the other workers get after one fails")
  parser.add_argument("--timeout_s", "--timeout-s", type=float, default=None,
                      help="stop everything after this many seconds")
  parser.add_argument(
    "--stop_timeout_s", "--stop-timeout-s", type=float, default=60.0,
    help="on SIGTERM/SIGHUP (forwarded to the workers as SIGTERM), Ctrl-C or --timeout_s: "
    "seconds the workers get to save and exit before they are SIGKILLed (default: 60)",
  )
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="extra environment variable for every worker (repeatable)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    split = argv.index("--")
    argv, command = argv[:split], argv[split + 1 :]
  else:
    command = []
  parser = _parser()
  args = parser.parse_args(argv)
  if not command:
    parser.error("give the command to run after '--'")
  extra = {}
  for item in args.env:
    key, sep, value = item.partition("=")
    if not sep or not key:
      parser.error(f"--env wants KEY=VALUE, got {item!r}")
    extra[key] = value
  try:
    return run_local(
      command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
      port=args.port, log_dir=args.log_dir, env=extra, grace_s=args.grace_s,
      timeout_s=args.timeout_s, stop_timeout_s=args.stop_timeout_s,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"launch/local.py: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
