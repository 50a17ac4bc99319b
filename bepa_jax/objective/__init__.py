"""The BEPA objective: MLM loss (mlm), InfoNCE with its options and chunked form (infonce),
heads, GradCache, and `Objective` (loss), which puts them together for the step."""
from bepa_jax.objective.loss import Objective  # noqa: F401
