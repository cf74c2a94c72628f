"""The ``cascadegw`` command: ``gateway.cli``, with Ctrl-C quiet from the first instant.

Loading the CLI imports msgspec, trio and the rest, which takes a moment; a Ctrl-C during it
would otherwise print a traceback from wherever the import happened to be.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from gateway.cli import main as run  # the import is what is guarded

        code = run()
    except KeyboardInterrupt:
        sys.stderr.write("cascadegw: interrupted\n")
        code = 130
    sys.exit(code)
