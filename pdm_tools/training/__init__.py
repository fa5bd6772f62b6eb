"""Training side: simulated data → autoencoder → ONNX → INT8 → threshold → manifest and model card.

``simdata`` makes feature rows with the serving feature code, ``autoencoder`` fits, ``export`` writes the
ONNX graph by hand, ``quantize`` makes and measures the INT8 model, ``train`` ties one model together
and ``cli`` is ``pdm-agent train``.
"""
