"""Multi-host initialization for bepa-jax.

Call :func:`initialize` once, first thing in every process, before any JAX
computation (and before ``jax.devices()``). It works out how this process fits
into the job and calls ``jax.distributed.initialize`` accordingly:

1. explicit arguments, else the environment variables
   ``BEPA_COORDINATOR_ADDRESS`` (``host:port``), ``BEPA_NUM_PROCESSES`` and
   ``BEPA_PROCESS_ID`` (this is what ``launch/local.py`` sets);
2. else SLURM (``srun``): ``SLURM_NTASKS`` (or ``SLURM_JOB_NUM_NODES``),
   ``SLURM_PROCID`` and the first host of ``SLURM_JOB_NODELIST`` plus a port
   (``BEPA_COORDINATOR_PORT``, or one derived from ``SLURM_JOB_ID``);
3. else, on a Cloud TPU VM or a GKE TPU pod, ``jax.distributed.initialize()``
   with no coordinates: JAX finds them in the TPU metadata itself;
4. else nothing happens: a single-process run.

Timeouts. In jax 0.10.x, when ``initialization_timeout`` expires the
coordination client does not raise: it aborts the whole process
(``LOG(FATAL)``, SIGABRT) from C++. To turn a coordinator that never answers, or
peers that never show up, into a Python exception, ``jax.distributed.initialize``
runs in a daemon thread and this module waits for it for ``timeout_s`` seconds.
JAX itself is given ``timeout_s + _JAX_GRACE_S`` seconds, so that our deadline
always fires first and the caller gets a :class:`DistributedInitError` with one
clear line; after that error the process cannot join the job any more and
should exit (it is aborted by JAX ``_JAX_GRACE_S`` seconds later otherwise).

This module imports nothing from ``bepa_jax`` but its errors.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import importlib.util
import os
import re
import socket
import threading
import time
from typing import Mapping, Sequence

import jax

from bepa_jax.errors import BepaError, ConfigError, one_line

__all__ = [
  "DistributedInitError",
  "DistributedSetup",
  "initialize",
  "is_coordinator",
  "resolve",
  "slurm_first_host",
  "on_cloud_tpu",
]

ENV_ADDRESS = "BEPA_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "BEPA_NUM_PROCESSES"
ENV_PROCESS_ID = "BEPA_PROCESS_ID"
ENV_PORT = "BEPA_COORDINATOR_PORT"

# Extra seconds JAX's own initialization timeout gets over ours (see module doc).
_JAX_GRACE_S = 60
# SLURM: default coordinator ports are 61440 + (job id mod 4096), like JAX's
# own SLURM support, so that two jobs sharing a node rarely collide.
_SLURM_PORT_BASE = 61440
_SLURM_PORT_SPAN = 4096


class DistributedInitError(BepaError, RuntimeError):
  """jax.distributed could not be brought up (timeout, unreachable coordinator, a process that
  was not started, ...): the job's set-up, not a bug, so one line and exit 2."""


@dataclasses.dataclass(frozen=True)
class DistributedSetup:
  """How this process was placed. ``method`` is one of "explicit", "slurm",
  "tpu" (JAX auto-detection) or "single" (no distributed init)."""

  method: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  @property
  def multi_process(self) -> bool:
    return self.method != "single"


# --------------------------------------------------------------------------- parsing


def _as_int(value, name: str) -> int | None:
  """Parse an integer argument / env value, naming ``name`` in the error."""
  if value is None:
    return None
  if isinstance(value, bool):
    raise ConfigError(f"{name} must be an integer, got {value!r}")
  if isinstance(value, int):
    return value
  text = str(value).strip()
  if text == "":
    return None
  try:
    return int(text, 10)
  except ValueError:
    raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _check_address(address: str, name: str) -> str:
  address = address.strip()
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
    raise ConfigError(f"{name} must look like HOST:PORT (e.g. 10.0.0.2:1234), got {address!r}")
  return address


def slurm_first_host(nodelist: str) -> str:
  """First host of a SLURM node list.

  Handles plain lists (``a,b``) and bracket ranges with zero padding and
  several groups: ``node[003-005,9]`` -> ``node003``,
  ``rack[1-2]-n[07-08]`` -> ``rack1-n07``.
  """
  text = nodelist.strip()
  if not text:
    raise ConfigError("SLURM_JOB_NODELIST is empty")
  # First top-level item: commas inside [...] do not separate hosts.
  depth, end = 0, len(text)
  for i, ch in enumerate(text):
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
    elif ch == "," and depth == 0:
      end = i
      break
  first = text[:end]

  def first_of_group(match: re.Match) -> str:
    item = match.group(1).split(",")[0].strip()
    return item.split("-")[0].strip()

  host = re.sub(r"\[([^\]]*)\]", first_of_group, first)
  if not host or "[" in host or "]" in host:
    raise ConfigError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
  return host


def _slurm_values(env: Mapping[str, str]) -> dict:
  """coordinator_address / num_processes / process_id from a SLURM step, or {}."""
  if "SLURM_PROCID" not in env:
    return {}
  out: dict = {"process_id": _as_int(env["SLURM_PROCID"], "SLURM_PROCID")}
  for name in ("SLURM_NTASKS", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
    if env.get(name):
      out["num_processes"] = _as_int(env[name], name)
      out["_num_processes_name"] = name
      break
  nodelist_var = next((n for n in ("SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)), None)
  if nodelist_var is not None:
    if env.get(ENV_PORT):
      port = _as_int(env[ENV_PORT], ENV_PORT)
    else:
      job_id = _as_int(env.get("SLURM_JOB_ID") or "0", "SLURM_JOB_ID")
      port = _SLURM_PORT_BASE + job_id % _SLURM_PORT_SPAN
    out["coordinator_address"] = f"{slurm_first_host(env[nodelist_var])}:{port}"
  return out


def on_cloud_tpu(env: Mapping[str, str] | None = None) -> bool:
  """True on a Cloud TPU VM / GKE TPU node (unless JAX_PLATFORMS excludes TPU)."""
  env = os.environ if env is None else env
  platforms = env.get("JAX_PLATFORMS", "").strip().lower()
  if platforms and "tpu" not in platforms.split(","):
    return False
  if any(env.get(k) for k in ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE")):
    return True
  if glob.glob("/dev/accel[0-9]*"):
    return True
  # /dev/vfio groups also exist for GPU pass-through: require libtpu as well.
  return bool(glob.glob("/dev/vfio/[0-9]*")) and importlib.util.find_spec("libtpu") is not None


def resolve(
  coordinator_address: str | None = None,
  num_processes: int | str | None = None,
  process_id: int | str | None = None,
  env: Mapping[str, str] | None = None,
) -> DistributedSetup:
  """Work out where this process belongs, without touching JAX.

  Raises ConfigError (a ValueError), naming the offending variable, on bad or
  inconsistent values.
  """
  env = os.environ if env is None else env
  names = {
    "coordinator_address": "coordinator_address"
    if coordinator_address is not None
    else ENV_ADDRESS,
    "num_processes": "num_processes" if num_processes is not None else ENV_NUM_PROCESSES,
    "process_id": "process_id" if process_id is not None else ENV_PROCESS_ID,
  }
  address = (
    coordinator_address if coordinator_address is not None else (env.get(ENV_ADDRESS) or None)
  )
  n = _as_int(
    num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES),
    names["num_processes"],
  )
  pid = _as_int(
    process_id if process_id is not None else env.get(ENV_PROCESS_ID), names["process_id"]
  )
  method = "explicit"

  if None in (address, n, pid):
    slurm = _slurm_values(env)
    if address is None and "coordinator_address" in slurm:
      address, names["coordinator_address"] = slurm["coordinator_address"], "SLURM_JOB_NODELIST"
      method = "slurm"
    if n is None and "num_processes" in slurm:
      n, names["num_processes"] = slurm["num_processes"], slurm["_num_processes_name"]
      method = "slurm"
    if pid is None and "process_id" in slurm:
      pid, names["process_id"] = slurm["process_id"], "SLURM_PROCID"
      method = "slurm"

  if address is None and n is None and pid is None:
    if on_cloud_tpu(env):
      return DistributedSetup("tpu")
    return DistributedSetup("single")

  if n is not None and n < 1:
    raise ConfigError(f"{names['num_processes']} must be >= 1, got {n}")
  if pid is not None and pid < 0:
    raise ConfigError(f"{names['process_id']} must be >= 0, got {pid}")
  if n is not None and pid is not None and pid >= n:
    raise ConfigError(
      f"{names['process_id']}={pid} must be smaller than {names['num_processes']}={n}"
    )
  if address is not None:
    address = _check_address(str(address), names["coordinator_address"])

  if n == 1 or (n is None and address is None and pid == 0):
    return DistributedSetup("single", address, 1, 0)
  if None in (address, n, pid):
    missing = [
      names[k]
      for k, v in (("coordinator_address", address), ("num_processes", n), ("process_id", pid))
      if v is None
    ]
    if on_cloud_tpu(env):  # let JAX's TPU auto-detection fill in the rest
      return DistributedSetup("tpu", address, n, pid)
    raise ConfigError(
      "incomplete multi-process setup: " + ", ".join(missing) + " not set "
      f"(need {ENV_ADDRESS}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or a SLURM step)"
    )
  return DistributedSetup(method, address, n, pid)


# --------------------------------------------------------------------------- init


def _wants_gloo() -> bool:
  """CPU multi-process needs gloo collectives (a no-op for TPU/GPU compute)."""
  platforms = getattr(jax.config, "jax_platforms", None) or os.environ.get("JAX_PLATFORMS") or ""
  platforms = [p.strip().lower() for p in platforms.split(",") if p.strip()]
  return not platforms or "cpu" in platforms


def _check_port_free(setup: DistributedSetup) -> None:
  """On process 0, which runs the coordinator: its port must be free. gRPC's bind failure
  ("Failed to add port") crashes the process (SIGSEGV) instead of raising, so test it first
  (as gRPC binds it: every interface, address reuse on)."""
  if setup.process_id != 0 or setup.coordinator_address is None:
    return
  port = int(setup.coordinator_address.rpartition(":")[2])
  flag = {"slurm": ENV_PORT}.get(setup.method, f"{ENV_ADDRESS} (or --coordinator_address)")
  for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this host: try IPv4
      continue
    with sock:
      sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        sock.bind((host, port))
      except OSError as e:
        if e.errno != errno.EADDRINUSE:  # e.g. IPv6 off: the IPv4 test decides
          continue
        raise DistributedInitError(
          f"coordinator port {setup.coordinator_address} is in use ({e.strerror}): another job "
          f"or an earlier run holds it; pick another port in {flag}") from None
    return


def _describe(setup: DistributedSetup, timeout_s: float) -> str:
  if setup.method == "tpu" and setup.coordinator_address is None:
    where = "coordinator=auto (TPU metadata)"
  else:
    where = f"coordinator={setup.coordinator_address}"
  return (
    f"{where}, process_id={setup.process_id}, num_processes={setup.num_processes}, "
    f"method={setup.method}, timeout={timeout_s:g}s"
  )


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: int | Sequence[int] | None = None,
  timeout_s: float = 300,
) -> DistributedSetup:
  """Bring up ``jax.distributed`` for this process (see the module docstring).

  Returns the :class:`DistributedSetup` used; ``method == "single"`` means no
  distributed initialization was needed. Calling it again after a successful
  multi-process initialization is a no-op.

  Raises:
    ConfigError (a ValueError): bad values (non-integer, process_id >= num_processes, ...),
      naming the flag or environment variable.
    DistributedInitError: the coordinator could not be reached, or not all
      processes joined within ``timeout_s`` seconds.
  """
  if timeout_s is None or timeout_s <= 0:
    raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
  setup = resolve(coordinator_address, num_processes, process_id)
  if setup.method == "single":
    return setup
  if jax.distributed.is_initialized():
    return setup

  kwargs: dict = {"initialization_timeout": int(timeout_s) + _JAX_GRACE_S}
  if local_device_ids is not None:
    kwargs["local_device_ids"] = local_device_ids
  if setup.coordinator_address is not None:
    kwargs["coordinator_address"] = setup.coordinator_address
  if setup.num_processes is not None:
    kwargs["num_processes"] = setup.num_processes
  if setup.process_id is not None:
    kwargs["process_id"] = setup.process_id
  _check_port_free(setup)
  if setup.method != "tpu" and _wants_gloo():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

  outcome: dict = {}

  def target() -> None:
    try:
      jax.distributed.initialize(**kwargs)
    except BaseException as err:  # handed to the waiting thread
      outcome["error"] = err

  start = time.monotonic()
  thread = threading.Thread(target=target, name="bepa-distributed-init", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise DistributedInitError(
      f"jax.distributed.initialize timed out after {time.monotonic() - start:.0f}s "
      f"({_describe(setup, timeout_s)}): the coordinator is unreachable or not all "
      "processes joined; check that every process was started and can reach the coordinator"
    )
  if "error" in outcome:
    err = outcome["error"]
    raise DistributedInitError(
      f"jax.distributed.initialize failed ({_describe(setup, timeout_s)}): "
      f"{type(err).__name__}: {one_line(err)}"
    ) from err
  return setup


def is_coordinator() -> bool:
  """True on the process that should write checkpoints / logs (process 0)."""
  return jax.process_index() == 0
