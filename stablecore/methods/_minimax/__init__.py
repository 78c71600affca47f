"""Internals of :mod:`stablecore.methods.minimax` (graph search, grouped MLPs, graph learning,
the paper's synthetic experiment)."""
