"""The compiled parts: the proxy's data path (src/mptcpkit/proxy/compiled.py) and the
run supervisor's socket() path (src/mptcpkit/run/fastpath.py).

Optional: without a C compiler and Python headers the build goes on without them; the
proxy relays and the supervisor answers in pure Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mptcpkit.proxy._engine",
            ["src/mptcpkit/proxy/_engine.c"],
            depends=["src/mptcpkit/proxy/_convert.h"],
            extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
            optional=True,
        ),
        Extension(
            "mptcpkit.run._fastpath",
            ["src/mptcpkit/run/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wno-missing-field-initializers"],
            optional=True,
        ),
    ]
)
