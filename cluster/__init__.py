"""Cluster: the composition root: CLI, embedded local stack, job submission (may import everything)."""
