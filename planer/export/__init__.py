"""From a trained planer model to engine files: ONNX emission and MoE lowering."""

from planer.export.lowering import LOWERINGS, OpsMoE, lower
from planer.export.onnx import ExportError, check_weights_present, export_block, export_fixed, export_lm

__all__ = ["LOWERINGS", "ExportError", "OpsMoE", "check_weights_present", "export_block", "export_fixed",
           "export_lm", "lower"]
