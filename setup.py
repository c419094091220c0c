"""The compiled parts: the proxy's data path (src/mptcpkit/proxy/compiled.py), the
run supervisor's socket() path (src/mptcpkit/run/fastpath.py) and the background
supervisor executable (src/mptcpkit/run/supervise.py), built next to the extensions.

Optional: without a C compiler and Python headers the build goes on without them; the
proxy relays and the supervisor answers in pure Python.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CFLAGS = ["-O2", "-Wall", "-Wno-missing-field-initializers"]
SUPERVISE = "src/mptcpkit/run/_supervise.c"
FORCE_H = "src/mptcpkit/run/_force.h"


class BuildExtAndSupervisor(build_ext):
    """build_ext, then `mptcpkit/run/_supervise` (a program, not an extension) in the
    same place as `_fastpath`, in place or in the build tree."""

    def run(self) -> None:
        super().run()
        target = os.path.join(
            os.path.dirname(self.get_ext_fullpath("mptcpkit.run._fastpath")), "_supervise"
        )
        newer = [SUPERVISE, FORCE_H]
        if (
            not self.force
            and os.path.exists(target)
            and all(os.path.getmtime(src) <= os.path.getmtime(target) for src in newer)
        ):
            return
        try:
            objects = self.compiler.compile(
                [SUPERVISE], output_dir=self.build_temp, extra_postargs=CFLAGS
            )
            self.compiler.link_executable(
                objects, os.path.basename(target), output_dir=os.path.dirname(target)
            )
        except Exception as exc:  # optional, as the extensions are
            print(f"warning: mptcpkit/run/_supervise not built ({exc}): the supervisor is Python")


setup(
    cmdclass={"build_ext": BuildExtAndSupervisor},
    ext_modules=[
        Extension(
            "mptcpkit.proxy._engine",
            ["src/mptcpkit/proxy/_engine.c"],
            depends=["src/mptcpkit/proxy/_convert.h"],
            extra_compile_args=CFLAGS,
            optional=True,
        ),
        Extension(
            "mptcpkit.run._fastpath",
            ["src/mptcpkit/run/_fastpath.c"],
            depends=[FORCE_H],
            extra_compile_args=CFLAGS,
            optional=True,
        ),
    ],
)
