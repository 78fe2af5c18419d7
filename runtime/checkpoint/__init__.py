"""Checkpoint readers and writers, one module per source format."""
