"""Engine building: what a device runs to turn the FP32 ONNX model into its engines.

``backends`` is the registry (one entry per inference backend), ``build`` builds one keyed,
manifested artifact, the ``*_builder`` modules write each backend's artifact, and
``quantization`` holds the FP16, INT8 and INT4 transforms. Used by ``build_engines.py`` and by the
server's start-up (``python -m service prepare``, ``ANEMIA_AUTO_BUILD``); imports only the
inference core in ``service`` (model info, preprocessing, engines manifest, runtime backends).
"""
