"""libtpu (XLA:TPU) on a host without a TPU: finding it, the topology's compile-only devices,
and the compile in a child process, since XLA:TPU can die of a signal instead of raising."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import jax

from bepa_jax import tpu_specs
from bepa_jax.errors import BepaError, one_line


class LibtpuMissing(BepaError):
  """libtpu (XLA:TPU, which compiles for TPU topologies) is not importable."""


class CompilerCrashed(BepaError):
  """XLA:TPU died of a signal in the child process: a compiler bug, not a config error."""

  def __init__(self, message: str, signal_number: int):
    super().__init__(message)
    self.signal_number = signal_number


def libtpu_pin() -> str:
  """The libtpu requirement of the installed jax's `tpu` extra, e.g. libtpu==0.0.42.*."""
  try:
    for req in importlib.metadata.requires("jax") or []:
      if req.startswith("libtpu") and "extra == \"tpu\"" in req:
        return req.split(";")[0].strip()
  except importlib.metadata.PackageNotFoundError:
    pass
  return "libtpu"


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
  if not libtpu_available():
    raise LibtpuMissing(f"libtpu is not installed (XLA:TPU compiles for the topology): "
                        f"pip install '{libtpu_pin()}' (jax {jax.__version__}'s tpu extra), or "
                        f"pip install -e '.[test]'")


def libtpu_version() -> str:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "?"


def topology_devices(topo: tpu_specs.Topology, slices: int) -> list:
  """The slice's compile-only devices (no TPU needed): libtpu's description of the topology."""
  from jax.experimental import topologies
  require_libtpu()
  # libtpu warns about a missing TPU environment unless told what it would run on
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # compile-only: no TPU is opened, so several processes (pytest -n 2, a sweep) may load libtpu
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.topology_name, chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=slices)
  except (jax.errors.JaxRuntimeError, RuntimeError) as e:
    raise BepaError(f"libtpu could not describe {topo.name} ({topo.topology_name}): "
                    f"{one_line(e)}") from None
  return list(desc.devices)


# ----------------------------------------------------------------------------- crash isolation
IN_PROCESS = "BEPA_COMPILE_IN_PROCESS"  # set in the child: compile here
# what a C++ fatal-signal handler prints (absl / libtpu), kept from the user's terminal
_CRASH_DUMP = re.compile(r"^\*\*\* SIG|^PC: @|^\s+@\s+0x|symbolize|RAW: ")


def crash_line(code: int, dump: list[str]) -> str:
  """One line for a compiler process killed by a signal, from its crash dump."""
  try:
    sig = signal.Signals(-code).name
  except ValueError:
    sig = f"signal {-code}"
  where = next((m.group(1) for line in dump
                if (m := re.search(r"PC: @\s+0x[0-9a-f]+\s+\S+\s+(\S+)", line))), "")
  what = " stack overflow" if any("STACK OVERFLOW" in line for line in dump) else ""
  return (f"XLA:TPU crashed compiling the step ({sig}{what}" + (f" in {where}" if where else "")
          + f", libtpu {libtpu_version()}): a compiler bug, not a config error; seen with "
          "threefry attention dropout fused into a scanned layer's matmul (packed rows, bf16, "
          "remat=dots_saveable): try --config.train.dropout_rng=rbg, or "
          "--config.model.scan_layers=False")


def run_isolated(cmd: list[str], out_path: str = "", env: dict | None = None,
                 lines: list | None = None) -> int:
  """Runs the compile in a child process, streams its output and returns its exit code.

  XLA:TPU can die of a signal (a C++ crash, no Python exception to catch): its crash dump is
  kept from the terminal and becomes CompilerCrashed, and a JSON {"failed": ...} at
  `out_path`. Ctrl-C reaches the child too: it says so; KeyboardInterrupt is re-raised here
  once it has exited. With `lines` the child is quiet: its stdout is dropped and its stderr
  lines go there instead of to the terminal (a search compiles many plans)."""
  env = dict(os.environ if env is None else env, **{IN_PROCESS: "1"})
  proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, errors="replace",
                          stdout=None if lines is None else subprocess.DEVNULL)
  dump = []
  try:
    for line in proc.stderr:
      if _CRASH_DUMP.search(line):
        dump.append(line)
      elif lines is not None:
        lines.append(line.rstrip("\n"))
      else:
        sys.stderr.write(line)
        sys.stderr.flush()
    code = proc.wait()
  except KeyboardInterrupt:
    proc.wait()
    raise
  if code >= 0:
    if lines is None:
      sys.stderr.writelines(dump)
    return code
  message = crash_line(code, dump)
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
      json.dump(dict(failed="crash", error=message, signal=-code), f, indent=2)
  raise CompilerCrashed(message, -code)
