"""``python -m vitfold.native [openvino|onnxruntime|tensorrt]``: compile the OpenVINO extension (the default),
the ONNX Runtime custom-op library or the TensorRT plugin ahead of ``build --fused-ops``; prints the
library's path (exit 2 with the reason if it cannot)."""

from __future__ import annotations

import sys

from . import NativeUnavailable, onnxruntime_ops, openvino_ops, tensorrt_plugin

BUILDERS = {"openvino": openvino_ops, "onnxruntime": onnxruntime_ops, "tensorrt": tensorrt_plugin}


def main(argv: list[str]) -> int:
    target = argv[0] if argv else "openvino"
    if target not in BUILDERS or len(argv) > 1:
        print(f"error: usage: python -m vitfold.native [{'|'.join(BUILDERS)}] (got {' '.join(argv)})", file=sys.stderr)
        return 2
    try:
        print(BUILDERS[target](log=lambda msg: print(msg, file=sys.stderr)))
    except NativeUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
