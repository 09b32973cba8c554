"""lrtrain: low-rank training dynamics in JAX."""

__version__ = "0.1.0"
