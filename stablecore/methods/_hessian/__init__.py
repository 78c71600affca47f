"""Internals of :mod:`stablecore.methods.sharpness`: the Hessian operator and Lanczos.

Import from :mod:`stablecore.methods.sharpness`; the names here may move.
"""
