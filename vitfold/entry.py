"""The ``vitfold`` / ``deploy.py`` entry point: the command line on Python >= 3.10, one clear line below.

On Python 3.8 / 3.9 (JetPack 5's Python is 3.8) pip installs vitfold's runtime side only: numpy, Pillow
and the device's backend, no torch. The export side (``build``, ``sweep``, ``profile``, ``inspect``)
runs on a workstation; this module says so instead of failing on the first missing import. It parses as
Python 3.8 (``tests/test_imports.py``).
"""

from __future__ import annotations

import sys

EXPORT_ON_A_WORKSTATION = (
    "error: the vitfold command line (build, sweep, profile, inspect) needs Python >= 3.10 with torch; "
    "this is Python {version}, where vitfold installs its runtime side only. Export on a workstation "
    "(`python deploy.py build --export-only ...`), copy the build folder here and run "
    "`python -m vitfold.device build DIR` (then `python -m vitfold.device profile DIR`)"
)


def main() -> None:
    """Run :func:`vitfold.cli.main`, or exit 2 with one line on a Python the export side does not run on."""
    if sys.version_info < (3, 10):
        version = ".".join(str(v) for v in sys.version_info[:3])
        sys.stderr.write(EXPORT_ON_A_WORKSTATION.format(version=version) + "\n")
        raise SystemExit(2)
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
