"""The model families the tools fit and export to ONNX, below the evaluations and the training of shipped models.

``autoencoder`` (numpy) and ``export`` (its scoring graph, and ``mlp_graph`` that every MLP graph is built
from), ``defect_mlp`` (the bearing defect classifier) and ``commissioning_export`` (the agent's
commissioning detector as ONNX, and its INT8 version).
"""
