"""Thin adapters (installed as ``stablecore.integrations``) for transformers, diffusers, torch_geometric.

Each submodule imports its framework; the core never imports this package.
"""
