"""``python -m vitfold.native``: compile the OpenVINO extension ahead of ``build --fused-ops``; prints its path."""

from __future__ import annotations

import sys

from . import NativeUnavailable, openvino_ops


def main() -> int:
    try:
        print(openvino_ops(log=lambda msg: print(msg, file=sys.stderr)))
    except NativeUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
