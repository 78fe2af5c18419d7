"""Sharded Haiku/JAX inference runtime for large language-model checkpoints."""
