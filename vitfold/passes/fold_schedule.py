"""fold-schedule: constant-fold the shape arithmetic a static schedule makes constant.

With every token count fixed, Shape -> Gather -> Concat chains, Reshape targets, Range/Expand sizes
and TopK's K are constants; folding them leaves a graph whose shapes a backend sees as static (and
whose TopK K is an initializer, as TensorRT 8.5 requires). onnx-graphsurgeon evaluates foldable
subgraphs with ONNX Runtime, which refuses IR versions above what it supports; the pipeline clamps
the IR version first because folding would otherwise be skipped with only a logged warning.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ._registry import register_pass


@register_pass("fold-schedule", tolerance=1e-5)  # ORT may fuse the folded graph differently
def fold_schedule(graph: gs.Graph) -> gs.Graph:
    """Fold shape arithmetic and constants, drop dead nodes, sort topologically."""
    return graph.fold_constants(fold_shapes=True, error_ok=False).cleanup().toposort()
