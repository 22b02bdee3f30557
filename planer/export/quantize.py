"""int8 blocks in an exported graph, made with ONNX Runtime's own quantizer.

A block the search put in int8 is exported in fp32 like every other, then the
MatMuls that hold its projections' weights are handed to
`onnxruntime.quantization.quantize_dynamic` (per-channel int8 weights in
the reduced range [-64, 64], dynamically quantized uint8 inputs:
MatMulInteger), and nothing else is. The reduced range keeps the u8 x s8
pair sums of CPUs without VNNI from saturating, so the engine computes exactly
what planer.nn.quant simulates (with the full range it did not, on an AVX2 host). The
MatMuls are found by their weights' contents, not by node or tensor names,
which the exporter invents. planer.nn.quant simulates the result in PyTorch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from planer.errors import PlanerError

# How an int8 block is made: recorded with every latency figure of one (a table is valid for one recipe).
INT8_RECIPE = "onnxruntime.quantization.quantize_dynamic: per-channel reduced-range int8 weights, dynamic uint8 inputs"


def quantize_int8(path: str | os.PathLike, weights: Iterable[np.ndarray]) -> int:
    """Quantize, in place, the MatMul/Gemm nodes of the ONNX file `path` whose weight is one of `weights`
    (nn.Linear layout, out x in; the graph may hold it transposed). Returns how many were quantized; a
    weight that no node multiplies by is refused (the export lost track of it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    wanted = {digest(w) for w in weights}
    if not wanted:
        return 0
    path = Path(path)
    model = onnx.load(str(path))
    _fold_transposes(model)
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, found, matched = [], set(), 0
    for i, node in enumerate(model.graph.node):
        weight = _linear_weight(node, initializers)
        if weight in wanted:  # one weight may feed several products (the exporter merges equal tensors)
            node.name = node.name or f"planer_int8_{i}"
            nodes.append(node.name)
            found.add(weight)
            matched += 1
            if node.op_type == "Gemm":  # the quantizer first splits a Gemm into `<name>_MatMul` and an Add
                nodes.append(f"{node.name}_MatMul")
    if found != wanted:
        raise PlanerError(f"{len(wanted - found)} int8 weight matrices have no MatMul in {path.name}; "
                          "this is a planer bug, please report it")
    tmp = path.with_name(f".{path.name}.int8.tmp")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer advises pre-processing at WARNING on every call
    try:
        quantize_dynamic(model, tmp, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes)
        made = sum(n.op_type == "MatMulInteger" for n in onnx.load(str(tmp)).graph.node)
        if made != matched:
            raise PlanerError(f"ONNX Runtime's quantizer made {made} int8 products of the {matched} asked for "
                              f"in {path.name}; this is a planer bug, please report it")
        os.replace(tmp, path)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)
    return made


def _fold_transposes(model: onnx.ModelProto) -> None:
    """Give each MatMul whose weight reaches it through a Transpose of an initializer that transposed matrix as an
    initializer of its own: the exporter folds small transposes only, so a tied output head of a large vocabulary
    multiplies by Transpose(embedding), and the quantizer takes constant weights alone. The embedding's lookup
    keeps the original table."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    transposed = {n.output[0]: n for n in graph.node if n.op_type == "Transpose" and n.input[0] in initializers
                  and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])
                  and len(initializers[n.input[0]].dims) == 2}
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in transposed:
            source = transposed[node.input[1]].input[0]
            name = f"{source}__planer_transposed"
            if name not in initializers:
                initializers[name] = numpy_helper.from_array(numpy_helper.to_array(initializers[source]).T.copy(),
                                                             name)
                graph.initializer.append(initializers[name])
            node.input[1] = name
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] in transposed
              and n.output[0] not in used]:
        graph.node.remove(n)


def _linear_weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> tuple | None:
    """The digest of the nn.Linear weight (out x in) a MatMul or Gemm node multiplies by, if it is one."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
        return None
    b = numpy_helper.to_array(initializers[node.input[1]])
    if b.ndim != 2:
        return None
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return digest(b if trans_b else b.T)


def digest(array: np.ndarray) -> tuple:
    """A matrix's identity by contents: graphs rename and merge tensors, never change their values."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).hexdigest()
