"""Build script: maps ``kernels/`` and ``integrations/`` into the ``stablecore`` package.

The compiled extension in ``csrc/`` is optional and built only when asked for
(``STABLECORE_BUILD_EXT=1 pip install --no-build-isolation -e .``); otherwise this file never
imports torch, so a plain ``pip install .`` works without a compiler or CUDA toolkit.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(include=["stablecore", "stablecore.*"])
    package_dir = {"stablecore": "stablecore"}
    for folder, name in (
        ("kernels", "stablecore.kernels"),
        ("integrations", "stablecore.integrations"),
    ):
        package_dir[name] = folder
        packages.append(name)
        for sub in find_packages(where=folder):
            packages.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


def _extensions() -> tuple[list, dict]:
    if os.environ.get("STABLECORE_BUILD_EXT", "0") != "1":
        return [], {}
    # Imported only here: building the extension needs torch's headers and build helpers.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.cpp"))
    cuda_sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.cu"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    want_cuda = os.environ.get("STABLECORE_BUILD_CUDA", "auto")
    from torch.utils.cpp_extension import CUDA_HOME

    use_cuda = cuda_sources and (
        want_cuda == "1" or (want_cuda == "auto" and CUDA_HOME is not None)
    )
    if use_cuda:
        ext = CUDAExtension(
            "stablecore._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "stablecore._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension}


packages, package_dir = _packages()
ext_modules, cmdclass = _extensions()
setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
