"""The OpenVINO runtime (a second CPU engine): the one-graph ONNX export on OpenVINO in fp32 (``engine``), and in INT8
one statically quantized model per sub-network, each cut out of the one graph (``subnets``)."""
