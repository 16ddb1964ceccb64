"""Builds the SPIRT Redis module (native/) as part of the normal `pip install`.

The module is a plain shared object that exports RedisModule_OnLoad; it is not a
Python extension and Python never imports it. We let setuptools compile it only
because that makes `pip install .` (and editable installs) build it with no
separate step. spirtd finds the file with `spirtd.redis.module.module_path()`.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    """Installs the built module by replacing the file, never by overwriting it.

    A running redis-server maps the module file; truncating and rewriting it in place
    (what a plain copy does) can crash that server. Unlinking first leaves it the old
    inode."""

    def copy_file(self, infile, outfile, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(outfile).endswith(".so") and os.path.exists(outfile):
            os.unlink(outfile)
        return super().copy_file(infile, outfile, *args, **kwargs)


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "spirtd._native.spirt_redis",
            sources=[
                "native/spirt.c",
                "native/rm_api.c",
                "native/commands.c",
                "native/jobs.c",
                "native/tensor.c",
                "native/rules.c",
                "native/optim.c",
                "native/kernels.c",
                "native/blake2b.c",
                "native/scratch.c",
                "native/codec.c",
                "native/pack.c",
            ],
            depends=[
                "native/rm_api.h",
                "native/commands.h",
                "native/jobs.h",
                "native/tensor.h",
                "native/rules.h",
                "native/optim.h",
                "native/kernels.h",
                "native/blake2b.h",
                "native/src.h",
                "native/scratch.h",
                "native/codec.h",
                "native/pack.h",
            ],
            # Portable build: no -march=native in what ships. -O3 auto-vectorises for
            # the baseline ISA; the kernels (kernels.c) are also compiled for AVX2, and
            # the set is picked at load (module argument ISA). -fopenmp-simd only
            # honours `omp simd` loop pragmas; it needs no OpenMP runtime.
            # -ffp-contract=off: no fused multiply-add anywhere, so every ISA and every
            # code path rounds the same way (results are bit-identical; native/README.md).
            extra_compile_args=[
                "-O3",
                "-ffp-contract=off",
                "-std=gnu11",
                "-fvisibility=hidden",
                "-pthread",
                "-fno-strict-aliasing",
                "-fopenmp-simd",
                "-Wall",
                "-Wextra",
            ],
            extra_link_args=["-pthread", "-lm"],
        )
    ],
)
