"""Torch-free inference library: model file, onnxruntime session, sampler chain, scorer."""
