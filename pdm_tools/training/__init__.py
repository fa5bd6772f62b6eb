"""Training side, the top of the tools' layers: build the shipped models and write their model directories.

``simdata`` makes feature rows from the simulator with the serving feature code; ``train`` fits an anomaly
autoencoder (``pdm_tools.models``), exports it, quantizes and gates it (``pdm_tools.quantization``), sets the
threshold and writes the manifest and model card; ``defect_train`` does the same for the CWRU defect
classifier after running its evaluation (``pdm_tools.evaluation.cwru``); ``cli`` is ``pdm-agent train``.
"""
