"""The fleet's anomaly autoencoders, one entry each: what differs between the process and the vibration
autoencoder is here, and nowhere else branches on the kind (``process_app``, ``process_ship``, ``cli``).

A kind's name is also its feature spec's ``kind`` (``agent.features.spec.FeatureSpec``), the run config's
``signal`` and ``fleet serve/client --model``. A third autoencoder would be one more ``AeKind`` in ``AE_KINDS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.commissioning.detector import DetectorConfig
from agent.features.spec import FeatureSpec

# The autoencoders' strategy when none is named (``fleet serve --model process|vibration``, ``fleet evaluate
# --dataset skab|simulator-vibration``, a submitted run without ``strategy``). FedProx: on SKAB's two sites it
# lifted F1 by 16 points over FedAvg and more than halved its spread over five seeds, and changed nothing
# measurable on 22 one-file clients or on the simulated vibration fleet (docs/fleet.md, "Over five seeds").
DEFAULT_STRATEGY = "fedprox"


def _vibration_spec() -> FeatureSpec:
    from pdm_tools.training.simdata import VIBRATION_SPEC

    return VIBRATION_SPEC


@dataclass(frozen=True)
class AeKind:
    """One autoencoder the fleet trains.

    ``model_id``: the registry's model its versions are. ``rows``: what one client row is, in messages.
    ``stored_features``: a client reads the feature vectors the agent stored for ``model_id`` (else the
    machine's raw process readings, ``--fields``). ``smoothed``: the machine's rows are smoothed over the
    commissioning detector's ``smoothing_steps`` (else one window's features are one row, as the agent's model
    scores them). ``feature_spec``: the spec the rows follow whatever the fleet says (else built from the
    fleet's ``--fields``, ``process_ship.fleet_spec``). ``heldout_threshold``: the version's threshold factor
    comes from the clients' held-out windows (``process_gate.heldout_factor``), else the commissioning rule.
    ``reads``: the model card's line on what the graph reads."""

    name: str
    model_id: str
    rows: str
    stored_features: bool
    smoothed: bool
    heldout_threshold: bool
    feature_spec: Callable[[], FeatureSpec] | None
    reads: Callable[[FeatureSpec], str]

    def detector(self, detector: DetectorConfig | None = None) -> DetectorConfig:
        """The commissioning settings of this kind's machines."""
        det = detector or DetectorConfig()
        return det if self.smoothed else dataclasses.replace(det, smoothing_steps=1)

    def row_names(self, spec: FeatureSpec) -> list[str]:
        """What one row of the autoencoder is: a process spec's channels (their smoothed readings, the
        ``_mean`` columns the graph gathers), else the spec's features themselves."""
        return list(spec.channels) if self.gathers_means else list(spec.feature_names())

    @property
    def gathers_means(self) -> bool:
        """The shipped graph reads the ``_mean`` columns of the agent's feature row (smoothed readings)."""
        return self.smoothed


AE_KINDS: dict[str, AeKind] = {
    kind.name: kind
    for kind in (
        AeKind(
            name="process",
            model_id="process-anomaly",
            rows="readings",
            stored_features=False,
            smoothed=True,
            heldout_threshold=False,
            feature_spec=None,
            reads=lambda spec: (
                f"reads the `_mean` columns of {', '.join(spec.channels)} (window {spec.window_samples} readings)"
            ),
        ),
        AeKind(
            name="vibration",
            model_id="vibration-anomaly",
            rows="vibration feature vectors",
            stored_features=True,
            smoothed=False,
            heldout_threshold=True,
            feature_spec=_vibration_spec,
            reads=lambda spec: (
                f"reads the window's {spec.n_features} vibration features (window {spec.window_samples} samples)"
            ),
        ),
    )
}


def ae_kind(name: str) -> AeKind:
    """The kind named ``name``; ``ValueError`` names the known ones."""
    if name not in AE_KINDS:
        raise ValueError(f"autoencoder kind {name!r}: one of {list(AE_KINDS)}")
    return AE_KINDS[name]


def kind_names() -> Sequence[str]:
    return tuple(AE_KINDS)
