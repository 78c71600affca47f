"""Triton kernels (installed as ``stablecore.kernels``): how to compute fast.

No autograd and no torch.library here; :mod:`stablecore.ops` wraps each kernel as a custom op.
Importing a kernel module needs Triton; ``stablecore.ops`` only does so when
:mod:`stablecore._backends` says Triton can serve a device.
"""
