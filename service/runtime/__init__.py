"""onnxruntime for one bundle: the session (provider choice, buckets, warm-up), the IOBinding
path that reuses its buffers, and the CUDA provider's options."""
