"""Build hook for the one compiled module (everything else is in pyproject.toml).

``synthfactory.ingest._flatc`` is the C flatten of plain NDJSON lines (the ingest hot loop). It is
optional: where no C compiler is found the package installs without it and ingest runs its Python path
(the same rows, slower); ``synthfactory.ingest.native.available()`` tells which.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "synthfactory.ingest._flatc",
            ["include/synthfactory/ingest/_flatc.c"],
            # -O3 here too: a CFLAGS in the environment replaces Python's own flags, and an unoptimised build
            # ingests ~3x slower (measured with CFLAGS=-march=x86-64-v3, which dropped -O3)
            extra_compile_args=["-std=c11", "-pthread", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
