"""The public datasets as the tools read them, at the bottom of the tools' layers.

``paths``: where the datasets are (``--data``, ``$PDM_DATASETS`` or ``../shared/datasets``); ``cwru``: the
CWRU bearing recordings, cut into windows and featurized (the defect classifier's training and evaluation
data). The SKAB files are read by their evaluation protocol (``pdm_tools.evaluation.skab``).
"""
