"""Evaluation of the models on real public data with the published protocols (``pdm-agent evaluate``)."""
