"""PyTorch -> ONNX -> TensorRT export pipeline. Graph names and I/O specs: ``export.specs``."""
