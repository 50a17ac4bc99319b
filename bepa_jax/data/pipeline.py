"""The input pipeline's interface: what training, checkpointing and benchmarks rely on.

There is one implementation, `pair_pipeline.PairPipeline`, for every source kind (the
embedded corpus included; data/factory.py builds it from the config). Its batch is a pure
function of (seed, step): a resume needs only the step, and `state_dict` adds the data
fingerprint that `verify_state` checks so that a resume on other data is refused.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from bepa_jax.data.batch_spec import BatchSpec


@runtime_checkable
class Pipeline(Protocol):
  truncated: int                     # sentences cut to data.max_length so far
  packing: bool                      # batches are packed (data.packing): see `batch`'s rows

  def batch(self, step: int, process_index: int = 0, process_count: int = 1,
            rows: tuple[int, int] | None = None) -> dict:
    """This process's rows of the global batch at `step`, numpy arrays as `spec` describes.
    Packed: `rows` = (sentence rows, TLM pair rows) per packing group; default: the pipeline's
    own, or one sequence per row for a step some group of the global batch does not fit --
    decided from the global plan, so the same on every process without a collective."""

  def spec(self, process_count: int = 1, rows: tuple[int, int] | None = None) -> BatchSpec:
    """The keys, shapes and dtypes of one process's batch (data/batch_spec.py)."""

  def languages_of(self, step: int) -> list[tuple[str, str]]:
    """(language of x, language of y) of every row of the global batch at `step`."""

  def state_dict(self, step: int) -> dict:
    """The input position stored in a checkpoint saved after `step` steps."""

  def verify_state(self, state: dict, *, continue_on_new_data: bool = False) -> list[str]:
    """Raises ConfigError naming the changed keys if `state` (from a checkpoint) came from other
    data, unless `continue_on_new_data`; returns the changes it accepted."""

  def report(self) -> str:
    """One log line: what was dropped, redrawn or truncated."""
