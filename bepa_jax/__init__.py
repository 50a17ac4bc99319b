"""bepa-jax: BERT-JEPA (BEPA) pretraining in JAX/Flax."""
__version__ = "0.1.0"
