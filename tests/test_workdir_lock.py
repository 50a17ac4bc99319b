"""One run per workdir: a second bepa-train on a busy workdir is refused and harms nothing."""
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO

HOLD = ("import sys, time\n"
        "from bepa_jax.workdir_lock import WorkdirLock\n"
        "WorkdirLock(sys.argv[1]).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _snapshot(wd):
  return {os.path.relpath(os.path.join(d, f), wd): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(wd) for f in fs}


def test_second_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "metrics.jsonl").write_text('{"step": 1}\n')
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(wd)], stdout=subprocess.PIPE,
                            text=True, env=_env(), cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = _snapshot(wd)
    r = subprocess.run([sys.executable, "-m", "bepa_jax.cli.train", "--workdir", str(wd),
                        "--config", "configs/quickstart.py", "--config.train.steps=2"],
                       capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "is in use by another run" in err[0], r.stderr
    assert f"pid {holder.pid}" in err[0] and "nothing was changed" in err[0]
    assert _snapshot(wd) == before  # not a byte written, not a file touched
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # the holder died without releasing: the next run takes the lock over with one warning
  r = subprocess.run([sys.executable, "-c",
                      "import logging, sys\nlogging.basicConfig(level=logging.INFO)\n"
                      "from bepa_jax.workdir_lock import WorkdirLock\n"
                      "with WorkdirLock(sys.argv[1]): print('ran')\n", str(wd)],
                     capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
  assert r.returncode == 0 and "ran" in r.stdout, r.stderr
  assert "taking over the stale lock" in r.stderr and f"pid {holder.pid}" in r.stderr
  # released cleanly: the next one takes it without a word
  t0 = time.time()
  r = subprocess.run([sys.executable, "-c", "import sys\nfrom bepa_jax.workdir_lock import "
                      "WorkdirLock\nwith WorkdirLock(sys.argv[1]): print('ran')\n", str(wd)],
                     capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
  assert r.returncode == 0 and "stale" not in r.stderr and time.time() - t0 < 60
