"""Builds the SPIRT Redis module (native/) as part of the normal `pip install`.

The module is a plain shared object that exports RedisModule_OnLoad; it is not a
Python extension and Python never imports it. We let setuptools compile it only
because that makes `pip install .` (and editable installs) build it with no
separate step. spirtd finds the file with `spirtd.native.module_path()`.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "spirtd._native.spirt_redis",
            sources=["native/spirt.c"],
            # Portable build: no -march=native in what ships. -O3 lets gcc
            # auto-vectorise the float loops for the baseline ISA (SSE2 on x86-64).
            extra_compile_args=["-O3", "-std=c11", "-fvisibility=hidden", "-pthread",
                                "-fno-strict-aliasing", "-Wall", "-Wextra"],
            extra_link_args=["-pthread", "-lm"],
        )
    ],
)
