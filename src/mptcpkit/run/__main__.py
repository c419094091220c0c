"""`python -m mptcpkit.run [--stats] (SCRIPT | -m MODULE) ARGS...`: a Python program, forced.

Runs the program in this interpreter under `mptcpkit.run.inprocess.forced()`, as
`python SCRIPT ARGS` / `python -m MODULE ARGS` would, with no supervisor process.
"""

from __future__ import annotations

import runpy
import sys

from mptcpkit.run.inprocess import forced

USAGE = "usage: python -m mptcpkit.run [--stats] (SCRIPT | -m MODULE) [ARGS...]"


def main(argv: list[str]) -> int:
    show_stats = False
    if argv[:1] == ["--stats"]:
        show_stats, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help") or (argv[0] == "-m" and len(argv) < 2):
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    code = 0
    with forced() as stats:
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = list(argv)
                sys.path.insert(0, __import__("os").path.dirname(argv[0]) or ".")
                runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        finally:
            if show_stats:
                print(f"mptcpkit run: {stats.line()}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
