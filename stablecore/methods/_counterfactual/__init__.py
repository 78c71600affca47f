"""Implementation of :mod:`stablecore.methods.counterfactual` (T-Rex), split by concern."""
