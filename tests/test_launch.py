"""launch/local.py: the local multi-process runner (fail-fast, timeouts, signals, no orphans).
The cloud launchers (gcloud TPU commands, GKE JobSet manifests): tests/test_launch_cloud.py."""

from __future__ import annotations

import io
import os
import signal
import sys
import textwrap
import time

import pytest

from launch import local

# The runner's Popen forks this (JAX-importing) test process and execs the worker at once, so
# Python's "os.fork() ... JAX is multithreaded" warning does not apply: nothing runs between.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

# --------------------------------------------------------------------------- local


def test_worker_env_replaces_device_count():
  env = local.worker_env(
    1, 2, 2, 5555, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo=1"}
  )
  assert env["BEPA_COORDINATOR_ADDRESS"] == "127.0.0.1:5555"
  assert (env["BEPA_NUM_PROCESSES"], env["BEPA_PROCESS_ID"], env["JAX_PLATFORMS"]) == (
    "2",
    "1",
    "cpu",
  )
  assert env["XLA_FLAGS"] == "--foo=1 --xla_force_host_platform_device_count=2"
  assert local.REPO_ROOT in env["PYTHONPATH"].split(os.pathsep)


def test_all_workers_succeed(tmp_path):
  code = textwrap.dedent(
    """
        import os
        print("worker", os.environ["BEPA_PROCESS_ID"], "of", os.environ["BEPA_NUM_PROCESSES"],
              os.environ["XLA_FLAGS"], flush=True)
        """
  )
  out = io.StringIO()
  rc = local.run_local(
    [sys.executable, "-c", code],
    num_processes=3,
    devices_per_process=2,
    log_dir=str(tmp_path),
    stream=out,
    timeout_s=30,
  )
  assert rc == 0, out.getvalue()
  for k in range(3):
    log = (tmp_path / f"worker_{k}.log").read_text()
    assert f"worker {k} of 3 --xla_force_host_platform_device_count=2" in log
  # only worker 0 is streamed to the console
  assert "worker 0 of 3" in out.getvalue() and "worker 1 of 3" not in out.getvalue()


FAILING = textwrap.dedent(
  """
    import os, sys, time
    if os.environ["BEPA_PROCESS_ID"] == "1":
        for i in range(30):
            print(f"log line {i}", flush=True)
        sys.exit(3)
    time.sleep(600)
    """
)


def test_fail_fast(tmp_path):
  out = io.StringIO()
  start = time.monotonic()
  rc = local.run_local(
    [sys.executable, "-c", FAILING], num_processes=2, log_dir=str(tmp_path), grace_s=1.0, stream=out
  )
  elapsed = time.monotonic() - start
  text = out.getvalue()
  assert rc == 3, text
  assert elapsed < 60
  assert "worker 1 failed with exit code 3" in text
  assert "killed worker(s) 0" in text
  assert "log line 29" in text and "log line 10" in text  # the last 20 lines ...
  assert "log line 9\n" not in text  # ... and only those


def test_cli_fail_fast(tmp_path):
  """`python launch/local.py ... -- CMD` as a script: non-zero exit, names the worker."""
  import subprocess

  start = time.monotonic()
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(local.REPO_ROOT, "launch", "local.py"),
      "--num_processes",
      "2",
      "--devices_per_process",
      "2",
      "--log_dir",
      str(tmp_path),
      "--grace_s",
      "1",
      "--",
      sys.executable,
      "-c",
      FAILING,
    ],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert time.monotonic() - start < 60
  assert "worker 1 failed with exit code 3" in proc.stdout
  assert (tmp_path / "worker_1.log").read_text().count("log line") == 30


def test_local_timeout(tmp_path):
  out = io.StringIO()
  rc = local.run_local(
    [sys.executable, "-c", "import time; time.sleep(600)"],
    num_processes=2,
    log_dir=str(tmp_path),
    stream=out,
    timeout_s=1,
  )
  assert rc == 124


# ------------------------------------------------------------ local: signals, no orphans

# Worker: record the pid (atomically), on SIGTERM write saved_K and exit 0, as a checkpoint
# save on preemption would; with IGNORE_TERM=K worker K ignores SIGTERM; with CHILD=1 each
# worker first starts a child (also in its process group) that ignores SIGTERM and sleeps.
SIGNAL_WORKER = textwrap.dedent(
  """
  import os, signal, subprocess, sys, time
  d, k = sys.argv[1], os.environ["BEPA_PROCESS_ID"]
  def note(name, text=""):
    with open(os.path.join(d, name + ".tmp"), "w") as f:
      f.write(text)
    os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))
  def on_term(signum, frame):
    note(f"saved_{k}")
    sys.exit(0)
  if os.environ.get("CHILD") == "1":
    child = subprocess.Popen([sys.executable, "-c",
      "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    note(f"child_{k}", str(child.pid))
  if os.environ.get("IGNORE_TERM") == k:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
  else:
    signal.signal(signal.SIGTERM, on_term)
  note(f"pid_{k}", str(os.getpid()))
  print("worker", k, "ready", flush=True)
  time.sleep(600)
  """
)


def _gone(pid: int) -> bool:
  """No such process, or only a zombie left (PID 1 here may not reap orphans)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except (OSError, IndexError):
    return True


def _wait_gone(pids, timeout: float = 5.0) -> list[int]:
  """The pids still alive after polling for ``timeout`` seconds."""
  end = time.monotonic() + timeout
  while True:
    alive = [p for p in pids if not _gone(p)]
    if not alive or time.monotonic() > end:
      return alive
    time.sleep(0.05)


def _wait_files(paths, timeout: float = 15.0) -> None:
  end = time.monotonic() + timeout
  while not all(os.path.exists(p) for p in paths):
    assert time.monotonic() < end, f"workers did not start: {[str(p) for p in paths]}"
    time.sleep(0.05)


def _signal_launcher(tmp_path, sig, *opts, env=None, names=("pid",)):
  """Start the launcher CLI with 2 SIGNAL_WORKERs, send ``sig`` once they are up.

  Returns (exit code, output, {name: [pid of worker 0, pid of worker 1]}).
  """
  import subprocess

  marks = tmp_path / "marks"
  marks.mkdir()
  cmd = [
    sys.executable,
    os.path.join(local.REPO_ROOT, "launch", "local.py"),
    "--num_processes",
    "2",
    "--log_dir",
    str(tmp_path / "logs"),
    *opts,
    "--",
    sys.executable,
    "-c",
    SIGNAL_WORKER,
    str(marks),
  ]
  proc = subprocess.Popen(
    cmd,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, **(env or {})},
    # Ctrl-C as at a terminal: an ignored SIGINT is inherited, and a Python started with it
    # ignored never raises KeyboardInterrupt. pytest itself may ignore it: a shell without job
    # control starts a background command (`bash .ci/run &`) with SIGINT and SIGQUIT ignored
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  pids = {}
  try:
    files = {n: [marks / f"{n}_{k}" for k in range(2)] for n in names}
    _wait_files([f for fs in files.values() for f in fs])
    pids = {n: [int(f.read_text()) for f in fs] for n, fs in files.items()}
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
  finally:
    if proc.poll() is None:  # a bug: do not hang the suite, do not leave workers behind
      proc.kill()
      proc.communicate()
    for pid in [p for ps in pids.values() for p in ps]:
      try:
        os.kill(pid, 9)
      except (ProcessLookupError, PermissionError):
        pass
  return proc.returncode, out, pids


@pytest.mark.parametrize(
  "sig, code, said",
  [
    (signal.SIGTERM, 143, "got SIGTERM, stopping all workers"),
    (signal.SIGHUP, 129, "got SIGHUP, stopping all workers"),
    (signal.SIGINT, 130, "interrupted, stopping all workers"),  # Ctrl-C
  ],
  ids=["SIGTERM", "SIGHUP", "SIGINT"],
)
def test_signal_forwarded_workers_save_and_exit(tmp_path, sig, code, said):
  """SIGTERM/SIGHUP/Ctrl-C to the launcher: each worker gets SIGTERM, saves, exits."""
  rc, out, pids = _signal_launcher(tmp_path, sig)
  assert rc == code, out
  assert (tmp_path / "marks" / "saved_0").exists() and (tmp_path / "marks" / "saved_1").exists()
  assert _wait_gone(pids["pid"]) == [], out
  assert f"[local] {said}" in out
  assert "[local] all workers exited" in out and "(exit codes: 0, 0)" in out


def test_signal_kills_worker_that_ignores_sigterm(tmp_path):
  """A worker still running --stop_timeout_s after SIGTERM is SIGKILLed and named."""
  start = time.monotonic()
  rc, out, pids = _signal_launcher(
    tmp_path, signal.SIGTERM, "--stop_timeout_s", "2", env={"IGNORE_TERM": "1"}
  )
  assert rc == 143, out
  assert 2 <= time.monotonic() - start < 20
  assert (tmp_path / "marks" / "saved_0").exists()
  assert not (tmp_path / "marks" / "saved_1").exists()
  assert _wait_gone(pids["pid"]) == [], out
  assert "[local] killed worker(s) 1 with SIGKILL, still running 2.0s after SIGTERM" in out
  assert "(exit codes: 0, -9)" in out


def test_signal_kills_workers_children(tmp_path):
  """The workers' children (the launcher's grandchildren) go with their process group."""
  rc, out, pids = _signal_launcher(
    tmp_path, signal.SIGTERM, "--stop_timeout_s", "5", env={"CHILD": "1"}, names=("pid", "child")
  )
  assert rc == 143, out
  assert _wait_gone(pids["pid"] + pids["child"]) == [], out


def test_no_orphan_after_success_and_handlers_restored(tmp_path):
  """Workers that exit 0 leaving a child behind: the child is killed on return too;
  run_local restores the SIGTERM/SIGHUP handlers it found."""
  script = textwrap.dedent(
    """
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(sys.argv[1] + "/child_" + __import__("os").environ["BEPA_PROCESS_ID"], "w") as f:
      f.write(str(child.pid))
    """
  )
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
  rc = local.run_local(
    [sys.executable, "-c", script, str(tmp_path)],
    num_processes=2,
    log_dir=str(tmp_path / "logs"),
    stream=io.StringIO(),
    timeout_s=30,
  )
  assert rc == 0
  assert {s: signal.getsignal(s) for s in before} == before
  children = [int((tmp_path / f"child_{k}").read_text()) for k in range(2)]
  assert _wait_gone(children) == []


def test_run_local_outside_main_thread(tmp_path):
  """Off the main thread no handler can be installed: run_local still runs, no crash."""
  import threading

  result = {}

  def target():
    try:
      result["rc"] = local.run_local(
        [sys.executable, "-c", "pass"],
        num_processes=2,
        log_dir=str(tmp_path),
        stream=io.StringIO(),
        timeout_s=30,
      )
    except BaseException as e:  # noqa: BLE001 - reported by the assert below
      result["error"] = repr(e)

  thread = threading.Thread(target=target)
  thread.start()
  thread.join(timeout=30)
  assert result == {"rc": 0}


def test_cli_help_names_stop_timeout(capsys):
  with pytest.raises(SystemExit):
    local.main(["--help"])
  help_text = " ".join(capsys.readouterr().out.split())
  assert "--stop_timeout_s" in help_text and "SIGTERM/SIGHUP" in help_text
