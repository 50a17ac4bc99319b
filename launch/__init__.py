"""Launchers for bepa-jax.

- ``launch/local.py``: N processes on this machine (CPU), for multi-host tests.
- ``launch/tpu.py``: Cloud TPU VM slices through ``gcloud``.
- ``launch/jobset.py``: GKE JobSet manifests for one or several TPU slices.
"""
