"""The ONNX Runtime runtime (the CPU engine): the one-graph ONNX export served on ONNX Runtime (``engine``), laid out
for this CPU (``layout``)."""
