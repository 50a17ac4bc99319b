#!/usr/bin/env python3
"""GKE JobSet manifest for bepa-train on one or several TPU slices (xpk style).

    python launch/jobset.py --name bepa-r1 --image us-docker.pkg.dev/P/R/bepa:latest \
        --accelerator-type v5litepod-64 --num_slices 2 \
        --config configs/base.py --workdir gs://BUCKET/runs/r1 \
        --config.train.steps=1000 --out bepa-r1.yaml
    kubectl apply -f bepa-r1.yaml

One replicated job, ``replicas`` = number of slices; each slice is one Job of
``hosts per slice`` pods (parallelism = completions), each pod asking for all
TPU chips of its host. With several slices the pods also get the Megascale
variables (``MEGASCALE_NUM_SLICES``, ``MEGASCALE_SLICE_ID``,
``MEGASCALE_COORDINATOR_ADDRESS``, ``MEGASCALE_PORT``) that join slices over
the data-center network, and bepa-train gets ``--config.mesh.dcn_data=S`` so the
slices form the ``dcn`` data axis of the mesh. ``jax.distributed.initialize()``
(called by ``bepa_jax.distributed.initialize``) finds its coordinates from these
and the ``TPU_WORKER_*`` variables GKE injects.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Mapping, Sequence

import yaml

MEGASCALE_PORT = 8080
# Ports xpk opens on TPU pods: 8471 (TPU slice builder), 8080 (Megascale / DCN).
CONTAINER_PORTS = (8471, 8080)


@dataclasses.dataclass(frozen=True)
class TpuSliceType:
  """One TPU slice shape as GKE sees it."""

  accelerator_type: str
  hosts: int  # VMs (= pods) per slice
  chips_per_host: int  # google.com/tpu per pod
  topology: str  # cloud.google.com/gke-tpu-topology
  gke_accelerator: str  # cloud.google.com/gke-tpu-accelerator

  @property
  def chips(self) -> int:
    return self.hosts * self.chips_per_host


def _table() -> dict[str, TpuSliceType]:
  table: dict[str, TpuSliceType] = {}

  def add(name: str, hosts: int, chips_per_host: int, topology: str, gke: str) -> None:
    table[name] = TpuSliceType(name, hosts, chips_per_host, topology, gke)

  # v4 and v5p are named by TensorCores (2 per chip), 4 chips per host, 3D torus.
  cube = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
  }
  for chips, topology in cube.items():
    add(f"v4-{2 * chips}", chips // 4, 4, topology, "tpu-v4-podslice")
    add(f"v5p-{2 * chips}", chips // 4, 4, topology, "tpu-v5p-slice")
  # v5e (v5litepod) and v6e are named by chips, 2D torus; up to 8 chips fit on one host.
  flat = {
    1: ("1x1", 1, 1),
    4: ("2x2", 1, 4),
    8: ("2x4", 1, 8),
    16: ("4x4", 4, 4),
    32: ("4x8", 8, 4),
    64: ("8x8", 16, 4),
    128: ("8x16", 32, 4),
    256: ("16x16", 64, 4),
  }
  for chips, (topology, hosts, per_host) in flat.items():
    add(f"v5litepod-{chips}", hosts, per_host, topology, "tpu-v5-lite-podslice")
    add(f"v6e-{chips}", hosts, per_host, topology, "tpu-v6e-slice")
  return table


ACCELERATORS: dict[str, TpuSliceType] = _table()


def slice_type(accelerator_type: str) -> TpuSliceType:
  """The slice shape of ``accelerator_type`` (e.g. "v4-32"); ValueError if unknown."""
  key = accelerator_type.strip().lower()
  if key not in ACCELERATORS:
    families: dict[str, list[str]] = {}
    for name in ACCELERATORS:
      families.setdefault(name.rsplit("-", 1)[0], []).append(name.rsplit("-", 1)[1])
    known = "; ".join(f"{fam}-{{{','.join(sizes)}}}" for fam, sizes in families.items())
    raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}; known: {known}")
  return ACCELERATORS[key]


_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _field(path: str) -> dict:
  return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def container_env(num_slices: int, extra: Mapping[str, str] | None = None) -> list[dict]:
  """Container env: JAX_PLATFORMS=tpu, the JobSet coordinates, Megascale for S > 1."""
  env: list[dict] = [
    {"name": "JAX_PLATFORMS", "value": "tpu"},
    {"name": "JOBSET_NAME", **_field("metadata.annotations['jobset.sigs.k8s.io/jobset-name']")},
    {
      "name": "REPLICATED_JOB_NAME",
      **_field("metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']"),
    },
  ]
  if num_slices > 1:
    env += [
      {"name": "MEGASCALE_NUM_SLICES", "value": str(num_slices)},
      {
        "name": "MEGASCALE_SLICE_ID",
        **_field("metadata.annotations['jobset.sigs.k8s.io/job-index']"),
      },
      # Pod 0 of slice 0, through the JobSet's headless service (subdomain = JobSet name).
      {
        "name": "MEGASCALE_COORDINATOR_ADDRESS",
        "value": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)",
      },
      {"name": "MEGASCALE_PORT", "value": str(MEGASCALE_PORT)},
    ]
  taken = {e["name"] for e in env}
  for key, value in (extra or {}).items():
    if key in taken:
      raise ValueError(f"--env {key} would override a variable the manifest sets")
    env.append({"name": key, "value": str(value)})
  return env


def train_command(
  config: str, workdir: str, num_slices: int, overrides: Sequence[str] = ()
) -> list[str]:
  command = ["bepa-train", "--config", config, "--workdir", workdir]
  if num_slices > 1:
    command.append(f"--config.mesh.dcn_data={num_slices}")
  for item in overrides:
    if not item.startswith("--config."):
      raise ValueError(f"config overrides look like --config.KEY=VALUE, got {item!r}")
  return command + list(overrides)


def pod_spec(
  tpu: TpuSliceType,
  container: dict,
  service_account: str | None = None,
  priority_class: str | None = None,
) -> dict:
  """One TPU host's pod: host network, pinned to the slice's accelerator and topology."""
  spec: dict = {
    "restartPolicy": "Never",
    "hostNetwork": True,
    "dnsPolicy": "ClusterFirstWithHostNet",
    "nodeSelector": {
      "cloud.google.com/gke-tpu-accelerator": tpu.gke_accelerator,
      "cloud.google.com/gke-tpu-topology": tpu.topology,
    },
    "containers": [container],
  }
  if service_account:
    spec["serviceAccountName"] = service_account
  if priority_class:
    spec["priorityClassName"] = priority_class
  return spec


def _metadata(name: str, tpu: TpuSliceType, queue: str | None) -> dict:
  metadata: dict = {
    "name": name,
    "labels": {"app.kubernetes.io/name": "bepa-jax", "bepa-jax/accelerator": tpu.accelerator_type},
    # One slice (child Job) per node pool, as xpk does.
    "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"},
  }
  if queue:
    metadata["labels"]["kueue.x-k8s.io/queue-name"] = queue
  return metadata


def build_jobset(
  name: str,
  image: str,
  accelerator_type: str,
  config: str,
  workdir: str,
  num_slices: int = 1,
  overrides: Sequence[str] = (),
  env: Mapping[str, str] | None = None,
  max_restarts: int = 0,
  queue: str | None = None,
  service_account: str | None = None,
  priority_class: str | None = None,
) -> dict:
  """The JobSet manifest as a dict (see the module docstring)."""
  if not _NAME.match(name) or len(name) > 40:
    raise ValueError(
      f"JobSet name must be a lowercase DNS label of at most 40 characters, got {name!r}"
    )
  if num_slices < 1:
    raise ValueError(f"num_slices must be >= 1, got {num_slices}")
  if max_restarts < 0:
    raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
  tpu = slice_type(accelerator_type)

  container = {
    "name": "bepa",
    "image": image,
    "command": train_command(config, workdir, num_slices, overrides),
    "env": container_env(num_slices, env),
    "ports": [{"containerPort": p} for p in CONTAINER_PORTS],
    "resources": {"limits": {"google.com/tpu": tpu.chips_per_host}},
  }
  return {
    "apiVersion": "jobset.x-k8s.io/v1alpha2",
    "kind": "JobSet",
    "metadata": _metadata(name, tpu, queue),
    "spec": {
      "failurePolicy": {"maxRestarts": max_restarts},
      "network": {"enableDNSHostnames": True},
      "replicatedJobs": [
        {
          "name": "slice",
          "replicas": num_slices,
          "template": {
            "spec": {
              "parallelism": tpu.hosts,
              "completions": tpu.hosts,
              "backoffLimit": 0,  # any pod failing fails the slice (and restarts the JobSet)
              "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "bepa-jax"}},
                "spec": pod_spec(tpu, container, service_account, priority_class),
              },
            }
          },
        }
      ],
    },
  }


def to_yaml(manifest: dict) -> str:
  return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.") and a != "--"]
  p = argparse.ArgumentParser(
    prog="launch/jobset.py",
    description=__doc__.split("\n\n")[0],
    epilog="Config overrides: add --config.KEY=VALUE arguments. Known accelerator types: "
    + ", ".join(ACCELERATORS),
  )
  p.add_argument("--name", required=True, help="JobSet name (lowercase DNS label)")
  p.add_argument("--image", required=True, help="container image with bepa-jax and jax[tpu]")
  p.add_argument("--accelerator-type", "--accelerator_type", dest="accelerator_type", required=True)
  p.add_argument("--num_slices", "--num-slices", dest="num_slices", type=int, default=1)
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", type=int, default=0)
  p.add_argument("--queue", help="Kueue LocalQueue name (label kueue.x-k8s.io/queue-name)")
  p.add_argument("--service-account", "--service_account", dest="service_account")
  p.add_argument("--priority-class", "--priority_class", dest="priority_class")
  p.add_argument("--out", help="write the manifest here instead of stdout")
  args = p.parse_args(rest)
  env = {}
  for item in args.env:
    key, sep, value = item.partition("=")
    if not sep or not key:
      p.error(f"--env wants KEY=VALUE, got {item!r}")
    env[key] = value
  try:
    manifest = build_jobset(
      args.name,
      args.image,
      args.accelerator_type,
      args.config,
      args.workdir,
      num_slices=args.num_slices,
      overrides=overrides,
      env=env,
      max_restarts=args.max_restarts,
      queue=args.queue,
      service_account=args.service_account,
      priority_class=args.priority_class,
    )
  except ValueError as err:
    p.error(str(err))
  text = to_yaml(manifest)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
