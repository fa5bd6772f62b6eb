"""What every tools stage shares, at the bottom of the tools' layers (it imports no other tools stage).

``graph_names``: the tensor and node names of our ONNX graphs (the exporters write them, the quantizer
keeps the named nodes in float); ``threshold``: the shipped anomaly threshold rule; ``modelcard``:
``MODEL_CARD.md`` of every shipped model and its figures, written by ``pdm-agent train`` and ``pdm-agent model
quantize --ship``; ``plots``: the PNG figures (matplotlib, imported only when one is drawn) of the model cards
and of ``pdm-agent evaluate --plots``; ``progress``: the progress lines of long commands.
"""
