"""Names in our ONNX graphs: what the exporters (``pdm_tools.models``) write and the quantizer relies on.

Every graph takes ``features`` float32 ``[batch, F]`` and standardizes it with two nodes named
``NORMALIZE_NODES`` (explicit Sub/Div). The anomaly graphs end in the score tail ``SCORE_NODES`` with
output ``score``; the classifier ends in Softmax/ArgMax (``CLASSIFIER_FLOAT_NODES``) with outputs
``probabilities`` and ``label``. The quantizer keeps these nodes in float (``pdm_tools.quantization``).
"""

from __future__ import annotations

OPSET = 17
IR_VERSION = 8  # what opset 17 was released with; every ONNX Runtime >= 1.14 reads it
INPUT_NAME = "features"
NORMALIZE_NODES = ("normalize_sub", "normalize_div")

# Anomaly models: one score per row.
OUTPUT_NAME = "score"
SCORE_NODES = ("score_sub", "score_square", "score_mean")

# The defect classifier: class probabilities and the index of the most probable class.
PROBABILITIES = "probabilities"
LABEL = "label"
CLASSIFIER_FLOAT_NODES = (*NORMALIZE_NODES, "softmax", "argmax")
