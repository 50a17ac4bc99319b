#!/usr/bin/env python3
"""Cloud TPU VM pods through gcloud: create, install, train, logs, stop, delete.

    python launch/tpu.py --name bepa --zone us-central2-b --accelerator-type v4-32 create
    python launch/tpu.py --name bepa --zone us-central2-b install --git-url https://github.com/ORG/bepa-jax
    python launch/tpu.py --name bepa --zone us-central2-b train \
        --config configs/base.py --workdir gs://BUCKET/runs/r1 -- --config.train.steps=1000
    python launch/tpu.py --name bepa --zone us-central2-b logs
    python launch/tpu.py --name bepa --zone us-central2-b stop
    python launch/tpu.py --name bepa --zone us-central2-b delete

``--dry-run`` prints each gcloud command (one per line, shell-quoted) instead of
running it. The global options (``--name --zone --project --accelerator-type
--version --dry-run``) go before or after the subcommand.

The ``*_commands`` functions build the commands (lists of argv lists) and run
nothing, so they can be tested.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Mapping, Sequence

DEFAULT_LOG_FILE = "$HOME/bepa-train.log"
DEFAULT_REMOTE_DIR = "bepa-jax"  # relative to the home directory
TRAIN_PROCESS_PATTERN = "[b]epa-train"  # the [b] keeps pkill from matching its own shell

# TPU VM software versions that suit each generation (gcloud --version).
_DEFAULT_RUNTIME = {
  "v4": "tpu-ubuntu2204-base",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5p": "v2-alpha-tpuv5",
  "v6e": "v2-alpha-tpuv6e",
}


@dataclasses.dataclass(frozen=True)
class Tpu:
  """Where the TPU slice lives."""

  name: str
  zone: str
  project: str | None = None
  accelerator_type: str | None = None
  version: str | None = None

  def runtime_version(self) -> str:
    if self.version:
      return self.version
    family = (self.accelerator_type or "").rsplit("-", 1)[0]
    if family not in _DEFAULT_RUNTIME:
      raise ValueError(
        f"no default --version for accelerator type {self.accelerator_type!r}; "
        "pass --version (a TPU VM runtime, e.g. tpu-ubuntu2204-base)"
      )
    return _DEFAULT_RUNTIME[family]

  def where(self) -> list[str]:
    flags = [f"--zone={self.zone}"]
    if self.project:
      flags.append(f"--project={self.project}")
    return flags


def _tpu_vm(tpu: Tpu, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *tpu.where()]


def _queued(tpu: Tpu, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, *args, *tpu.where()]


def ssh_command(tpu: Tpu, script: str, worker: str = "all") -> list[str]:
  """``gcloud ... ssh NAME --worker=W --command=SCRIPT``."""
  return _tpu_vm(tpu, "ssh", tpu.name, f"--worker={worker}", f"--command={script}")


def create_commands(tpu: Tpu, queued: bool = False, spot: bool = False) -> list[list[str]]:
  """Create the TPU VM slice (directly, or as a queued resource)."""
  if not tpu.accelerator_type:
    raise ValueError("create needs --accelerator-type (e.g. v4-32)")
  spot_flag = ["--spot"] if spot else []
  if queued:
    return [
      _queued(
        tpu,
        "create",
        tpu.name,
        f"--node-id={tpu.name}",
        f"--accelerator-type={tpu.accelerator_type}",
        f"--runtime-version={tpu.runtime_version()}",
        *spot_flag,
      )
    ]
  return [
    _tpu_vm(
      tpu,
      "create",
      tpu.name,
      f"--accelerator-type={tpu.accelerator_type}",
      f"--version={tpu.runtime_version()}",
      *spot_flag,
    )
  ]


def install_commands(
  tpu: Tpu,
  git_url: str | None = None,
  ref: str | None = None,
  local_dir: str | None = None,
  remote_dir: str = DEFAULT_REMOTE_DIR,
  jax_spec: str = "jax[tpu]",
) -> list[list[str]]:
  """Install jax[tpu] and the project on every worker: pip from ``git_url``
  (at ``ref``), or copy ``local_dir`` to ``remote_dir`` (relative to the home
  directory) with scp and pip install that copy."""
  if (git_url is None) == (local_dir is None):
    raise ValueError("install needs exactly one of --git-url or --local-dir")
  pip = "python3 -m pip install --upgrade"
  steps = [f"{pip} pip", f"{pip} {shlex.quote(jax_spec)}"]
  if git_url is not None:
    spec = f"git+{git_url}" + (f"@{ref}" if ref else "")
    return [ssh_command(tpu, " && ".join(steps + [f"{pip} {shlex.quote(spec)}"]))]
  if ref:
    raise ValueError("--ref only applies to --git-url")
  # pip needs a path that cannot be mistaken for a package name.
  target = remote_dir if remote_dir.startswith(("/", "~", "./")) else f"./{remote_dir}"
  return [
    # scp into an existing directory would nest the copy: clear it first.
    ssh_command(tpu, f"rm -rf {shlex.quote(remote_dir)}"),
    _tpu_vm(
      tpu,
      "scp",
      "--recurse",
      os.path.abspath(local_dir),
      f"{tpu.name}:{remote_dir}",
      "--worker=all",
    ),
    ssh_command(tpu, " && ".join(steps + [f"{pip} {shlex.quote(target)}"])),
  ]


def train_script(
  config: str,
  workdir: str,
  overrides: Sequence[str] = (),
  env: Mapping[str, str] | None = None,
  log_file: str = DEFAULT_LOG_FILE,
  remote_dir: str | None = None,
) -> str:
  """The shell line each worker runs: bepa-train in the background, logging to ``log_file``."""
  train = ["bepa-train", "--config", config, "--workdir", workdir, *overrides]
  exports = ['export PATH="$HOME/.local/bin:$PATH"']
  exports += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
  cd = [f"cd {remote_dir}"] if remote_dir else []
  run = f"setsid nohup {shlex.join(train)} > {log_file} 2>&1 < /dev/null &"
  return "; ".join(exports + cd + [run])


def train_commands(
  tpu: Tpu,
  config: str,
  workdir: str,
  overrides: Sequence[str] = (),
  env: Mapping[str, str] | None = None,
  log_file: str = DEFAULT_LOG_FILE,
  remote_dir: str | None = None,
  allow_local_workdir: bool = False,
) -> list[list[str]]:
  """Start training on all workers (in the background, with nohup)."""
  if not workdir.startswith("gs://") and not allow_local_workdir:
    raise ValueError(
      f"--workdir must be a gs:// path shared by all workers, got {workdir!r} "
      "(pass --allow-local-workdir to use a per-worker local path)"
    )
  for item in overrides:
    if not item.startswith("--config."):
      raise ValueError(f"config overrides look like --config.KEY=VALUE, got {item!r}")
  return [ssh_command(tpu, train_script(config, workdir, overrides, env, log_file, remote_dir))]


def logs_commands(tpu: Tpu, log_file: str = DEFAULT_LOG_FILE, lines: int = 100) -> list[list[str]]:
  """Follow worker 0's training log."""
  return [ssh_command(tpu, f"tail -n {int(lines)} -F {log_file}", worker="0")]


def stop_commands(tpu: Tpu, wait_s: int = 10) -> list[list[str]]:
  """Stop training on every worker: SIGTERM, then SIGKILL what is left."""
  pattern = shlex.quote(TRAIN_PROCESS_PATTERN)
  script = f"pkill -TERM -f {pattern}; sleep {int(wait_s)}; pkill -KILL -f {pattern}; true"
  return [ssh_command(tpu, script)]


def delete_commands(tpu: Tpu, queued: bool = False) -> list[list[str]]:
  """Delete the slice (and its queued resource with --queued)."""
  if queued:
    return [_queued(tpu, "delete", tpu.name, "--force", "--quiet")]
  return [_tpu_vm(tpu, "delete", tpu.name, "--quiet")]


def format_commands(commands: Sequence[Sequence[str]]) -> str:
  """One shell-quoted command per line."""
  return "".join(shlex.join(c) + "\n" for c in commands)


def run_commands(commands: Sequence[Sequence[str]], dry_run: bool = False, out=None) -> int:
  """Run the commands one after the other (stop at the first failure), or print them."""
  out = sys.stdout if out is None else out
  if dry_run:
    out.write(format_commands(commands))
    out.flush()
    return 0
  for command in commands:
    out.write(f"+ {shlex.join(command)}\n")
    out.flush()
    try:
      code = subprocess.call(list(command))
    except FileNotFoundError:
      out.write("gcloud not found: install the Google Cloud SDK, or use --dry-run\n")
      return 127
    except KeyboardInterrupt:
      return 130
    if code != 0:
      return code
  return 0


def _parse_env(items: Sequence[str], parser: argparse.ArgumentParser) -> dict[str, str]:
  env = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      parser.error(f"--env wants KEY=VALUE, got {item!r}")
    env[key] = value
  return env


def build_parser() -> argparse.ArgumentParser:
  def add_globals(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    p.add_argument("--name", default=d(None), help="TPU (and queued resource) name")
    p.add_argument("--zone", default=d(os.environ.get("CLOUDSDK_COMPUTE_ZONE")))
    p.add_argument("--project", default=d(None))
    p.add_argument(
      "--accelerator-type",
      "--accelerator_type",
      dest="accelerator_type",
      default=d(None),
      help="e.g. v4-32, v5litepod-64, v5p-128",
    )
    p.add_argument("--version", default=d(None), help="TPU VM runtime version")
    p.add_argument(
      "--dry-run",
      "--dry_run",
      dest="dry_run",
      action="store_true",
      default=d(False),
      help="print the gcloud commands, run nothing",
    )

  parser = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.split("\n\n")[0])
  add_globals(parser, suppress=False)
  sub = parser.add_subparsers(dest="cmd", required=True)

  def subparser(name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    add_globals(p, suppress=True)
    return p

  p = subparser("create", "create the TPU VM slice")
  p.add_argument("--queued", action="store_true", help="use a queued resource")
  p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")

  p = subparser("install", "install jax[tpu] and the project on all workers")
  p.add_argument("--git-url", "--git_url", dest="git_url")
  p.add_argument("--ref", help="git branch, tag or commit")
  p.add_argument(
    "--local-dir",
    "--local_dir",
    dest="local_dir",
    help="copy this checkout with scp instead of pip-installing from git",
  )
  p.add_argument("--remote-dir", "--remote_dir", dest="remote_dir", default=DEFAULT_REMOTE_DIR)

  p = subparser("train", "start bepa-train on all workers (background)")
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH shared by all workers")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--log-file", "--log_file", dest="log_file", default=DEFAULT_LOG_FILE)
  p.add_argument(
    "--remote-dir",
    "--remote_dir",
    dest="remote_dir",
    default=None,
    help="cd here first (e.g. the --local-dir copy)",
  )
  p.add_argument("--allow-local-workdir", action="store_true")
  p.epilog = "Config overrides: add --config.KEY=VALUE arguments (anywhere on the line)."

  p = subparser("logs", "follow worker 0's training log")
  p.add_argument("--log-file", "--log_file", dest="log_file", default=DEFAULT_LOG_FILE)
  p.add_argument("--lines", type=int, default=100)

  p = subparser("stop", "stop training on all workers")
  p.add_argument("--wait-s", "--wait_s", dest="wait_s", type=int, default=10)

  p = subparser("delete", "delete the slice")
  p.add_argument("--queued", action="store_true", help="delete the queued resource too")
  return parser


def commands_for(args: argparse.Namespace) -> list[list[str]]:
  if not args.name:
    raise ValueError("--name is required")
  if not args.zone:
    raise ValueError("--zone is required (or set CLOUDSDK_COMPUTE_ZONE)")
  tpu = Tpu(args.name, args.zone, args.project, args.accelerator_type, args.version)
  if args.cmd == "create":
    return create_commands(tpu, queued=args.queued, spot=args.spot)
  if args.cmd == "install":
    return install_commands(
      tpu, git_url=args.git_url, ref=args.ref, local_dir=args.local_dir, remote_dir=args.remote_dir
    )
  if args.cmd == "train":
    return train_commands(
      tpu,
      args.config,
      args.workdir,
      args.overrides,
      args.env_dict,
      args.log_file,
      args.remote_dir,
      args.allow_local_workdir,
    )
  if args.cmd == "logs":
    return logs_commands(tpu, args.log_file, args.lines)
  if args.cmd == "stop":
    return stop_commands(tpu, args.wait_s)
  if args.cmd == "delete":
    return delete_commands(tpu, queued=args.queued)
  raise ValueError(f"unknown command {args.cmd!r}")


def main(argv: Sequence[str] | None = None, out=None) -> int:
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  # `--config.KEY=VALUE` overrides (train only) may come anywhere; keep their order.
  overrides = [a for a in argv if a.startswith("--config.")]
  args = parser.parse_args([a for a in argv if not a.startswith("--config.") and a != "--"])
  if overrides and args.cmd != "train":
    parser.error(f"config overrides only apply to 'train': {' '.join(overrides)}")
  args.overrides = overrides
  args.env_dict = _parse_env(getattr(args, "env", []), parser)
  try:
    commands = commands_for(args)
  except ValueError as err:
    parser.error(str(err))
  return run_commands(commands, dry_run=args.dry_run, out=out)


if __name__ == "__main__":
  sys.exit(main())
