"""launch/tpu.py and launch/jobset.py: gcloud TPU commands (dry runs) and GKE JobSet manifests.
The local multi-process runner: tests/test_launch.py."""

from __future__ import annotations

import io
import shlex

import pytest
import yaml

from launch import jobset, tpu

# --------------------------------------------------------------------------- tpu (gcloud)

V4_32 = ["--name", "bepa", "--zone", "us-central2-b", "--accelerator-type", "v4-32", "--dry-run"]


def dry_run(*args: str) -> list[list[str]]:
  out = io.StringIO()
  assert tpu.main([*V4_32, *args], out=out) == 0
  return [shlex.split(line) for line in out.getvalue().splitlines()]


def test_dry_run_create_v4_32():
  (cmd,) = dry_run("create")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "bepa"]
  assert "--accelerator-type=v4-32" in cmd and "--zone=us-central2-b" in cmd
  assert "--version=tpu-ubuntu2204-base" in cmd and "--spot" not in cmd


def test_dry_run_create_queued_spot():
  (cmd,) = dry_run("create", "--queued", "--spot")
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "bepa"]
  assert {
    "--node-id=bepa",
    "--accelerator-type=v4-32",
    "--spot",
    "--runtime-version=tpu-ubuntu2204-base",
  } <= set(cmd)


def test_dry_run_install_train_logs_stop_delete():
  (install,) = dry_run("install", "--git-url", "https://github.com/org/bepa-jax", "--ref", "v1")
  assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bepa"]
  assert "--worker=all" in install
  script = next(a for a in install if a.startswith("--command="))
  assert "jax[tpu]" in script and "git+https://github.com/org/bepa-jax@v1" in script

  (train,) = dry_run(
    "train",
    "--config",
    "configs/base.py",
    "--workdir",
    "gs://b/run1",
    "--",
    "--config.train.steps=100",
    "--config.model.name=tiny bert",
  )
  assert train[4:7] == ["ssh", "bepa", "--worker=all"]
  script = next(a for a in train if a.startswith("--command="))[len("--command=") :]
  assert "nohup bepa-train --config configs/base.py --workdir gs://b/run1" in script
  assert (
    "--config.train.steps=100 '--config.model.name=tiny bert'" in script
  )  # quoted for the remote shell
  assert script.rstrip().endswith("&") and "> $HOME/bepa-train.log 2>&1" in script

  (logs,) = dry_run("logs")
  assert "--worker=0" in logs and "--command=tail -n 100 -F $HOME/bepa-train.log" in logs

  (stop,) = dry_run("stop")
  assert "--worker=all" in stop
  assert any(a.startswith("--command=pkill") for a in stop)

  (delete,) = dry_run("delete")
  assert delete == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "delete",
    "bepa",
    "--quiet",
    "--zone=us-central2-b",
  ]


def test_install_by_copy_and_project():
  t = tpu.Tpu("bepa", "europe-west4-a", project="my-proj", accelerator_type="v5litepod-16")
  rm, scp, pip = tpu.install_commands(t, local_dir=".")
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
  assert "bepa:bepa-jax" in scp and "--worker=all" in scp and "--project=my-proj" in scp
  assert "--command=rm -rf bepa-jax" in rm
  assert any("./bepa-jax" in a for a in pip)
  assert tpu.create_commands(t)[0][-3:] == [
    "--version=v2-alpha-tpuv5-lite",
    "--zone=europe-west4-a",
    "--project=my-proj",
  ]


def test_tpu_bad_input():
  t = tpu.Tpu("bepa", "z")
  with pytest.raises(ValueError, match="gs://"):
    tpu.train_commands(t, "c.py", "/tmp/run")
  with pytest.raises(ValueError, match="accelerator-type"):
    tpu.create_commands(t)
  with pytest.raises(ValueError, match="exactly one"):
    tpu.install_commands(t)
  with pytest.raises(SystemExit):
    tpu.main(["--zone", "z", "--dry-run", "delete"], out=io.StringIO())  # no --name


# --------------------------------------------------------------------------- jobset (GKE)


def manifest(num_slices: int, accelerator: str = "v5litepod-64") -> dict:
  m = jobset.build_jobset(
    "bepa-r1",
    "us-docker.pkg.dev/p/r/bepa:1",
    accelerator,
    "configs/base.py",
    "gs://b/r1",
    num_slices=num_slices,
    overrides=["--config.train.steps=7"],
    env={"WANDB_MODE": "offline"},
  )
  return yaml.safe_load(jobset.to_yaml(m))


def _env(container: dict) -> dict:
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("num_slices", [1, 2])
def test_jobset_manifest(num_slices):
  m = manifest(num_slices)
  assert (m["apiVersion"], m["kind"], m["metadata"]["name"]) == (
    "jobset.x-k8s.io/v1alpha2",
    "JobSet",
    "bepa-r1",
  )
  (rjob,) = m["spec"]["replicatedJobs"]
  assert rjob["replicas"] == num_slices
  job = rjob["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 16  # v5litepod-64: 16 hosts x 4 chips
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
    "cloud.google.com/gke-tpu-topology": "8x8",
  }
  (container,) = pod["containers"]
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert container["command"][:5] == [
    "bepa-train",
    "--config",
    "configs/base.py",
    "--workdir",
    "gs://b/r1",
  ]
  assert container["command"][-1] == "--config.train.steps=7"
  env = _env(container)
  assert env["JAX_PLATFORMS"] == "tpu" and env["WANDB_MODE"] == "offline"
  megascale = {k for k in env if k.startswith("MEGASCALE_")}
  if num_slices == 1:
    assert not megascale
    assert not any("dcn" in a for a in container["command"])
  else:
    assert megascale == {
      "MEGASCALE_NUM_SLICES",
      "MEGASCALE_SLICE_ID",
      "MEGASCALE_COORDINATOR_ADDRESS",
      "MEGASCALE_PORT",
    }
    assert env["MEGASCALE_NUM_SLICES"] == "2"
    assert "job-index" in env["MEGASCALE_SLICE_ID"]["fieldRef"]["fieldPath"]
    assert "--config.mesh.dcn_data=2" in container["command"]


@pytest.mark.parametrize(
  "accelerator, hosts, chips, topology",
  [
    ("v4-8", 1, 4, "2x2x1"),
    ("v4-32", 4, 4, "2x2x4"),
    ("v4-128", 16, 4, "4x4x4"),
    ("v4-256", 32, 4, "4x4x8"),
    ("v5litepod-8", 1, 8, "2x4"),
    ("v5litepod-256", 64, 4, "16x16"),
    ("v5p-128", 16, 4, "4x4x4"),
  ],
)
def test_accelerator_table(accelerator, hosts, chips, topology):
  t = jobset.slice_type(accelerator)
  assert (t.hosts, t.chips_per_host, t.topology) == (hosts, chips, topology)


def test_jobset_unknown_accelerator():
  with pytest.raises(ValueError, match="unknown TPU accelerator type 'v9-8'"):
    jobset.slice_type("v9-8")
  with pytest.raises(ValueError, match="unknown TPU accelerator"):
    manifest(1, "v4-12")


def test_jobset_cli(tmp_path, capsys):
  out = tmp_path / "js.yaml"
  args = [
    "--name",
    "bepa-r2",
    "--image",
    "img:1",
    "--accelerator-type",
    "v4-32",
    "--num_slices",
    "2",
    "--config",
    "configs/base.py",
    "--workdir",
    "gs://b/r2",
    "--config.x=1",
    "--out",
    str(out),
  ]
  assert jobset.main(args) == 0
  m = yaml.safe_load(out.read_text())
  (rjob,) = m["spec"]["replicatedJobs"]
  assert (rjob["replicas"], rjob["template"]["spec"]["parallelism"]) == (2, 4)
  with pytest.raises(SystemExit):
    jobset.main(args[:5] + ["v4-33"] + args[6:-2])
  assert "unknown TPU accelerator type 'v4-33'" in capsys.readouterr().err
