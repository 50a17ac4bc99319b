"""The BEPA objective: MLM loss, InfoNCE (plain and chunked), heads, GradCache."""
from bepa_jax.objective.loss import Objective, make_loss_fn  # noqa: F401
