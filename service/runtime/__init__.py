"""The inference backends behind one interface (``base.InferenceBackend``): ONNX Runtime on the
CPU, TensorRT on NVIDIA GPUs. Which one runs, and how it is loaded, is the backend registry's
business (``engine_build/backends.py``); this package imports no engine building."""
