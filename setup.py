"""Builds node._maglev, the C population loop of the Maglev table (see node/maglev.py).

Everything else about the package lives in pyproject.toml; setuptools merges the two. The
extension is optional at build time: without a C compiler or Python headers the install still
succeeds and node.maglev falls back to its pure-Python loop (same tables, ~50x slower), and the
test suite says so.
"""

import os

from setuptools import Extension, setup

# No fused multiply-add or other floating-point contraction: the turn rule must round exactly
# like the Python fallback, or the two could build different tables.
CFLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math"] if os.name == "posix" else []

setup(
    ext_modules=[
        Extension(
            "node._maglev",
            sources=["node/_maglev.c"],
            extra_compile_args=CFLAGS,
            optional=True,
        )
    ]
)
