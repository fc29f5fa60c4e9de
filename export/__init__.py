"""Export stage: ONNX export, TensorRT engine build, parity checks."""
