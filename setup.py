"""The proxy's compiled data path (see src/mptcpkit/proxy/compiled.py).

Optional: without a C compiler and Python headers the build goes on without it, and
the proxy relays in pure Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mptcpkit.proxy._engine",
            ["src/mptcpkit/proxy/_engine.c"],
            extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
