"""ONNX export: float and Q/DQ graphs, simplification, custom-op export."""
