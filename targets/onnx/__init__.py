"""The ``onnx`` target: the lowered graph as ONNX models for onnxruntime (see ``build``)."""
