"""See the package docstring of stablecore."""
