"""Is "no envelope trace" a property of the CWRU data or of our demodulation? Per damaged bearing, the
``envelope_visible`` verdict of ``pdm_tools.evaluation.cwru`` under several demodulations side by side.

    python -m pdm_tools.evaluation.cwru_visibility [--data DIR] [--json]

For every method, each window gets the evidence of each defect family (BPFI, BPFO, BSF; a ball's is the
larger of BSF and 2 x BSF): ``20 log10(peak / local background)`` of the lines h = 1..3 of the family in
the method's envelope spectrum, averaged over h, scored exactly as the shipped ``envelope_evidence`` group
scores them (``agent.features.bearing``: peak within max(1.5 bins, 2 %) of the line, background the median
of the bins within max(10 bins, half the shaft frequency) around it). A bearing is **visible** when the
median over its windows (all loads, hop 2048) of its own family's evidence exceeds the **largest** value of
the same evidence on any healthy window (the three healthy parts of the evaluation, 24 windows), as in
``cwru.envelope_visible``. Also printed: that ratio (median / healthy max), the margin in dB, the share of
the bearing's windows above the healthy max, and ``lead``: the median of its own family's evidence minus
the strongest other defect's (> 0: the envelope points at the right defect).

Methods (4096-sample windows unless said):

  v1          the version-1 ``envelope_peaks`` (Hilbert envelope of 500-2500 and 2500-5000 Hz, peaks
              against the envelope spectrum's global median, best of the two bands), in dB
  ses-grid    the shipped raw evidence ``evr``: squared envelope (SES), best of 13 fixed bands per family
  cpw-grid    the shipped pre-whitened evidence ``evw`` (cepstral pre-whitening: unit spectral magnitude,
              phase kept; SES; best of the 13 bands): the verdict ``evaluate cwru`` reports
  cpw-full    CPW then SES of the whole band (Smith & Randall 2015, their second method): one band, so no
              best-of-13 choice inflates the healthy maximum
  sk          the band of largest spectral kurtosis (a fast-kurtogram-like grid: 3000, 2000, 1500, 1000
              and 750 Hz wide bands tiling 0 Hz to Nyquist, or to ``--sk-top-hz``; chosen per window without
              looking at any line), SES
  tsa-sk      the shaft's time-synchronous average (period from the rpm, resampled to 512 samples per
              revolution) subtracted first (removes the shaft harmonics: discrete/random separation), then
              as ``sk`` (Smith & Randall's benchmark method)
  cpw-sk      CPW, then as ``sk``
  cpw-full-8  as ``cpw-full``, the SES averaged over 8 consecutive windows (1.7 s): a longer record
  cpw-full-4x as ``cpw-full`` on 16384-sample windows (1.4 s, 0.73 Hz bins; healthy: the whole recording)

With ``--scan``, also per recording: where its envelope lines *are*. The first 5.08 s of the recording (the
length of the healthy one, 0.2 Hz bins), CPW, SES of the whole band, scanned from 1.5 to 12.5 x shaft in
steps of 0.002: each multiple's peak (within 0.3 %) over its local background, in dB; printed are the
five strongest distinct multiples and the best value within 2 % of BPFI, BPFO, BSF and 2 x BSF, beside the
healthy recording's strongest. A defect whose lines stand out at its own multiples in 5 s but not in the
0.34-s windows is a matter of record length; one whose strongest lines sit elsewhere does not match the
assumed geometry or speed; one with no line above the healthy recording's leaves no periodic trace.

Nothing is fitted; the figures depend on the data only. Deterministic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.features.bearing import (
    BearingFeatureSpec,
    _evidence_targets,
    _families,
    _hann,
    _line_bins,
    _local_peak_db,
    bearing_features,
)
from pdm_tools.datasets.cwru import DatasetError, Recording, cut, default_data_dir, load_cwru, normal_parts
from pdm_tools.evaluation.cwru import DEFECT_FREQUENCY, FEATURE_SETS, bearing_id

WINDOW = 4096
HOP = 2048
# Kurtogram-like band grid: widths fs/4, fs/6, fs/8, fs/12, fs/16 at 12 kHz (Antoni's levels 1 to 3 with
# the 1/3 levels); narrower bands cannot carry 3 x BPFI (~490 Hz) in their envelope.
SK_WIDTHS_HZ = (3000.0, 2000.0, 1500.0, 1000.0, 750.0)
SK_TOP_HZ = 6000.0
TSA_SAMPLES_PER_REV = 512
METHODS = ("v1", "ses-grid", "cpw-grid", "cpw-full", "sk", "tsa-sk", "cpw-sk", "cpw-full-8", "cpw-full-4x")
FAMILIES = ("bpfi", "bpfo", "bsf")
SPEC = FEATURE_SETS["envelope"]


def whiten(spectrum: np.ndarray) -> np.ndarray:
    """Cepstral pre-whitening of one-sided spectra: every line to unit magnitude, phase kept."""
    magnitude = np.abs(spectrum)
    floor = 1e-12 * magnitude.max(axis=-1, keepdims=True)
    return np.divide(spectrum, magnitude, out=np.zeros_like(spectrum), where=magnitude > floor)


def ses(spectrum: np.ndarray, freqs: np.ndarray, lo: float, hi: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared-envelope amplitude spectrum (Hann-windowed, mean removed) of the band ``[lo, hi)`` of the
    one-sided spectra ``(m, n // 2 + 1)``, and the envelope kurtosis E|z|^4 / (E|z|^2)^2 of that band."""
    band = np.where((freqs >= lo) & (freqs < hi), spectrum, 0.0)
    full = np.zeros((band.shape[0], n), dtype=np.complex128)
    full[:, : band.shape[1]] = 2.0 * band
    z = np.fft.ifft(full, axis=1)
    sq = z.real**2 + z.imag**2
    power = sq.mean(axis=1)
    kurt = np.divide((sq * sq).mean(axis=1), power**2, out=np.ones_like(power), where=power > 0)
    sq = (sq - power[:, None]) * _hann(n)
    return np.abs(np.fft.rfft(sq, axis=1)), kurt


def family_evidence(spectra: np.ndarray, rate: float, n: int, rpm: float) -> np.ndarray:
    """``(m, 3)`` dB evidence of BPFI, BPFO, BSF (the larger of BSF and 2 x BSF) in the envelope spectra
    ``(m, bins)`` on the ``rate / n`` grid, scored as the shipped evidence."""
    targets, slices = _evidence_targets(SPEC)
    m = spectra.shape[0]
    index, zone, background = _line_bins(np.full(m, rate / n), np.full(m, rpm / 60.0), targets, spectra.shape[1])
    db = _local_peak_db(spectra[None], index, zone, background)[0]  # (m, lines)
    per = {c: db[:, slices[j]].mean(axis=1) for j, c in enumerate(_families(SPEC))}
    return np.stack([per["bpfi"], per["bpfo"], np.maximum(per["bsf"], per["bsf_even"])], axis=1)


def _sk_grid(rate: float, top_hz: float) -> list[tuple[float, float]]:
    top = min(rate / 2, top_hz)
    return [(k * w, (k + 1) * w) for w in SK_WIDTHS_HZ for k in range(int(top // w))]


def _best_sk_band(spectrum: np.ndarray, freqs: np.ndarray, n: int, rate: float, top_hz: float) -> np.ndarray:
    """Per row, the SES of the band of largest envelope kurtosis in ``_sk_grid``."""
    results = [ses(spectrum, freqs, lo, hi, n) for lo, hi in _sk_grid(rate, top_hz)]
    kurt = np.stack([k for _, k in results])  # (bands, m)
    pick = kurt.argmax(axis=0)
    return np.stack([results[b][0][i] for i, b in enumerate(pick)])


def tsa_residual(x: np.ndarray, rate: float, rpm: float) -> np.ndarray:
    """``x`` ``(m, n)`` minus its shaft-synchronous average (linear resampling to ``TSA_SAMPLES_PER_REV``
    samples per revolution over the whole revolutions of the window, averaged, interpolated back)."""
    m, n = x.shape
    per_rev = rate * 60.0 / rpm  # samples per revolution
    revs = int(n // per_rev)
    t = np.arange(n)
    angle_grid = np.arange(revs * TSA_SAMPLES_PER_REV) * (per_rev / TSA_SAMPLES_PER_REV)
    out = np.empty_like(x)
    for i in range(m):
        resampled = np.interp(angle_grid, t, x[i]).reshape(revs, TSA_SAMPLES_PER_REV)
        average = resampled.mean(axis=0)
        phase = (t % per_rev) * (TSA_SAMPLES_PER_REV / per_rev)
        # Periodic linear interpolation of the average at each sample's shaft angle.
        lo = np.floor(phase).astype(int) % TSA_SAMPLES_PER_REV
        frac = phase - np.floor(phase)
        synchronous = (1 - frac) * average[lo] + frac * average[(lo + 1) % TSA_SAMPLES_PER_REV]
        out[i] = x[i] - synchronous
    return out


def evidence(method: str, samples: np.ndarray, rate: float, rpm: float, sk_top_hz: float = SK_TOP_HZ) -> np.ndarray:
    """``(windows, 3)`` evidence of BPFI, BPFO, BSF of ``method`` over the windows of ``samples`` (the kurtogram's
    bands end at ``sk_top_hz``)."""
    n = 4 * WINDOW if method == "cpw-full-4x" else WINDOW
    x = cut(samples, n, HOP)
    if len(x) == 0:
        return np.empty((0, 3))
    x = x - x.mean(axis=1, keepdims=True)
    if method in ("v1", "ses-grid", "cpw-grid"):
        return _from_features(method, x, rate, rpm)
    freqs = np.fft.rfftfreq(n) * rate
    if method == "tsa-sk":
        x = tsa_residual(x, rate, rpm)
    spectrum = np.fft.rfft(x, axis=1)
    if method.startswith("cpw"):
        spectrum = whiten(spectrum)
    if method.startswith("cpw-full"):
        spectra, _ = ses(spectrum, freqs, freqs[1], rate / 2, n)
    else:
        spectra = _best_sk_band(spectrum, freqs, n, rate, sk_top_hz)
    if method == "cpw-full-8":
        # Averaged over 8 consecutive windows (hop 2048: 18432 samples); one row per such segment.
        k = 8
        if len(spectra) < k:
            return np.empty((0, 3))
        csum = np.cumsum(np.concatenate([np.zeros((1, spectra.shape[1])), spectra]), axis=0)
        spectra = (csum[k:] - csum[:-k]) / k
    return family_evidence(spectra, rate, n, rpm)


def _from_features(method: str, x: np.ndarray, rate: float, rpm: float) -> np.ndarray:
    if method == "v1":
        spec = BearingFeatureSpec(groups=("envelope_peaks",))
        rows = bearing_features(spec, x, np.full(len(x), rate), np.full(len(x), rpm))
        names = spec.feature_names()

        def fam(c: str) -> np.ndarray:
            cols = [
                [names.index(f"env{b}_{c}_{h}x") for h in range(1, spec.harmonics + 1)]
                for b in range(len(spec.envelope_bands_hz))
            ]
            return 20.0 * np.max([rows[:, c_].mean(axis=1) for c_ in cols], axis=0)  # log10 -> dB

        return np.stack([fam("bpfi"), fam("bpfo"), fam("bsf")], axis=1)
    variant = "r" if method == "ses-grid" else "w"
    spec = BearingFeatureSpec(groups=("envelope_evidence",))
    rows = bearing_features(spec, x, np.full(len(x), rate), np.full(len(x), rpm))
    names = spec.feature_names()
    col = {c: rows[:, names.index(f"ev{variant}_{c}")] for c in ("bpfi", "bpfo", "bsf", "bsf_even")}
    return np.stack([col["bpfi"], col["bpfo"], np.maximum(col["bsf"], col["bsf_even"])], axis=1)


def visibility(
    recordings: Sequence[Recording],
    methods: Sequence[str] = METHODS,
    progress: Callable[[str], None] | None = None,
    sk_top_hz: float = SK_TOP_HZ,
) -> dict[str, Any]:
    """Per method and bearing: the verdict and its figures (see the module docstring); JSON-ready."""
    faults = [r for r in recordings if r.kind != "normal"]
    normal = max((r for r in recordings if r.kind == "normal"), key=lambda r: len(r.samples))
    bearings: dict[str, list[Recording]] = {}
    for r in faults:
        bearings.setdefault(bearing_id(r), []).append(r)
    out: dict[str, Any] = {}
    for method in methods:
        t0 = time.perf_counter()
        if method in ("cpw-full-4x", "cpw-full-8"):  # the parts are too short for these segments
            healthy = evidence(method, normal.samples, normal.rate_hz, normal.rpm, sk_top_hz)
        else:
            healthy = np.concatenate(
                [evidence(method, part, normal.rate_hz, normal.rpm, sk_top_hz) for part in normal_parts(normal)]
            )
        rows: dict[str, Any] = {}
        for name, recs in sorted(bearings.items()):
            ev = np.concatenate([evidence(method, r.samples, r.rate_hz, r.rpm, sk_top_hz) for r in recs])
            own = FAMILIES.index(DEFECT_FREQUENCY[recs[0].kind])
            others = [j for j in range(3) if j != own]
            median = float(np.median(ev[:, own]))
            top = float(healthy[:, own].max())
            rows[name] = {
                "kind": recs[0].kind,
                "windows": len(ev),
                "median_db": round(median, 2),
                "healthy_max_db": round(top, 2),
                "ratio": round(median / top, 3) if top > 0 else None,
                "margin_db": round(median - top, 2),
                "share_above": round(float(np.mean(ev[:, own] > top)), 3),
                "lead_db": round(float(np.median(ev[:, own] - ev[:, others].max(axis=1))), 2),
                "visible": median > top,
            }
        out[method] = {
            "healthy_windows": len(healthy),
            "visible": sum(r["visible"] for r in rows.values()),
            "visible_and_leading": sum(r["visible"] and r["lead_db"] > 0 for r in rows.values()),
            "bearings": rows,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if progress:
            progress(f"{method}: {out[method]['visible']} of {len(rows)} visible ({out[method]['seconds']} s)")
    return out


SCAN_LINES = {"bpfi": 5.4152, "bpfo": 3.5848, "bsf": 4.7135, "2bsf": 2 * 4.7135}


def scan_lines(samples: np.ndarray, rate: float, rpm: float, n: int, top: int = 5) -> dict[str, Any]:
    """The strongest envelope lines of the first ``n`` samples (see the module docstring, ``--scan``)."""
    x = samples[:n] - samples[:n].mean()
    freqs = np.fft.rfftfreq(n) * rate
    spectrum, _ = ses(whiten(np.fft.rfft(x)[None]), freqs, freqs[1], rate / 2, n)
    e, df, shaft = spectrum[0], rate / n, rpm / 60.0
    multiples = np.arange(1.5, 12.5, 0.002)
    centre = np.round(multiples * shaft / df).astype(np.int64)
    tol = np.maximum(1, np.round(0.003 * multiples * shaft / df)).astype(np.int64)
    half = max(10, round(0.5 * shaft / df))
    offsets = np.arange(-half, half + 1)
    near = e[centre[:, None] + offsets]  # (multiples, 2 half + 1)
    zone = np.abs(offsets)[None, :] <= tol[:, None]
    peak = np.where(zone, near, -np.inf).max(axis=1)
    background = np.nanmedian(np.where(zone, np.nan, near), axis=1)
    db = 20.0 * np.log10(peak / background)
    strongest: list[int] = []
    for j in np.argsort(-db):
        if all(abs(multiples[j] - multiples[k]) > 0.05 for k in strongest):
            strongest.append(int(j))
        if len(strongest) == top:
            break
    return {
        "strongest": [[round(float(multiples[j]), 3), round(float(db[j]), 1)] for j in strongest],
        "at": {c: round(float(db[np.abs(multiples - m) <= 0.02 * m].max()), 1) for c, m in SCAN_LINES.items()},
    }


def scan(recordings: Sequence[Recording]) -> dict[str, Any]:
    """``scan_lines`` of every recording, all cut to the healthy recording's length."""
    normal = max((r for r in recordings if r.kind == "normal"), key=lambda r: len(r.samples))
    n = min(len(r.samples) for r in recordings)
    ordered = [normal, *(r for r in recordings if r is not normal)]
    return {r.file.removesuffix(".npz"): scan_lines(r.samples, r.rate_hz, r.rpm, n) for r in ordered}


def render_scan(result: dict[str, Any]) -> str:
    lines = [
        "Strongest envelope lines of each recording's first 5.08 s (CPW, SES, whole band): multiple of shaft "
        "speed @ dB over local background; then the best within 2 % of BPFI / BPFO / BSF / 2 BSF",
    ]
    for name, r in result.items():
        strongest = "  ".join(f"{m:6.3f}@{d:4.1f}" for m, d in r["strongest"])
        at = " / ".join(f"{r['at'][c]:4.1f}" for c in SCAN_LINES)
        lines.append(f"{name:<14}{strongest}   {at}")
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    methods = list(result)
    names = list(next(iter(result.values()))["bearings"])
    lines = [
        "Envelope visibility per bearing: median own-family evidence / healthy max (dB / dB); "
        "* visible (median > healthy max), + own family leads (lead > 0)",
        f"{'bearing':<10}" + "".join(f"{m:>13}" for m in methods),
    ]
    for b in names:
        cells = []
        for m in methods:
            r = result[m]["bearings"][b]
            mark = ("*" if r["visible"] else " ") + ("+" if r["lead_db"] > 0 else " ")
            cells.append(f"{r['median_db']:5.1f}/{r['healthy_max_db']:4.1f}{mark}")
        lines.append(f"{b:<10}" + "".join(f"{c:>13}" for c in cells))
    lines.append(f"{'visible':<10}" + "".join(f"{result[m]['visible']:>13}" for m in methods))
    lines.append(f"{'vis+lead':<10}" + "".join(f"{result[m]['visible_and_leading']:>13}" for m in methods))
    lines.append(f"{'healthy n':<10}" + "".join(f"{result[m]['healthy_windows']:>13}" for m in methods))
    lines.append("")
    lines.append("Margin (median - healthy max, dB) / share of windows above the healthy max / lead (dB):")
    lines.append(f"{'bearing':<10}" + "".join(f"{m:>19}" for m in methods))
    for b in names:
        cells = [
            f"{r['margin_db']:+5.1f} {r['share_above']:4.2f} {r['lead_db']:+5.1f}"
            for r in (result[m]["bearings"][b] for m in methods)
        ]
        lines.append(f"{b:<10}" + "".join(f"{c:>19}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="CWRU folder with index.json")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument(
        "--sk-top-hz", type=float, default=SK_TOP_HZ, help=f"top of the kurtogram's bands (default {SK_TOP_HZ:g})"
    )
    parser.add_argument("--scan", action="store_true", help="also the strongest envelope lines of each recording")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}")
    try:
        recordings = load_cwru(args.data if args.data is not None else default_data_dir())
    except DatasetError as exc:
        print(f"cwru_visibility: {exc}", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        print(line, file=sys.stderr)

    result: dict[str, Any] = {"methods": visibility(recordings, methods, progress, args.sk_top_hz)}
    if args.scan:
        result["scan"] = scan(recordings)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result["methods"]))
        if args.scan:
            print("\n" + render_scan(result["scan"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
