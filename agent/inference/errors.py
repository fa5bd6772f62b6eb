"""Errors of the inference stage."""

from __future__ import annotations


class ModelError(Exception):
    """A model directory cannot be used: bad manifest, wrong checksum, or a session that does not match.

    Raised at load time (start of the agent, or ``pdm-agent`` commands), never per window: a model
    that loads has been verified against its manifest and its feature specification.
    """
