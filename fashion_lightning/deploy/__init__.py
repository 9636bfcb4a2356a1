"""Deployment: the trained model as standard ONNX graphs that ONNX Runtime runs on CPUs.

``bundle`` is the folder format (manifest, checks; no onnx / onnxruntime import), ``onnx_export`` writes a
folder from a model artefact and checks it against PyTorch, ``quantize`` adds int8 graphs with their
accuracy cost, ``onnx_encoder`` runs a folder behind the recommender's encoder protocol. onnx and
onnxruntime come with the ``[export]`` extra.
"""
