"""Vendor phase conventions -> wrapped radians (see /work/shared/REFERENCES.md, "Vendor phase in DICOM").

The input is the *rescaled* phase of a whole stack (every echo and slice: stored value times
RescaleSlope plus RescaleIntercept, per image), because a unit can only be told from the value range
of the whole acquisition, never from one slice. Rules, tried in this order:

1. **Siemens** (Manufacturer contains ``SIEMENS``): stored 0..4095 with RescaleSlope 2 and
   RescaleIntercept -4096 gives rescaled values in [-4096, 4095]; radians = rescaled * pi / 4096.
   Without a rescale (slope 1, intercept 0) the stored 0..4095 are read as (v - 2048) * pi / 2048.
2. **RescaleType** ``rad``/``radians``/``mrad``/``milliradians`` when present is believed, but only
   if the range agrees (|v| <= 2 pi, or <= 2000 pi for mrad); a disagreeing label is refused.
3. **Range** (Philips and others): rescaled within [-pi, pi] or [0, 2 pi] -> radians; otherwise within
   [-1000 pi, 1000 pi] or [0, 2000 pi] -> milliradians. Anything else is refused: a wrong unit would
   silently scale every susceptibility value.

A tolerance of 1 % of the range absorbs the rounding of the scanner's slope. Results are wrapped to
[-pi, pi). Real/imaginary pairs (GE) do not come here: their phase is ``atan2(imag, real)``.
"""

from __future__ import annotations

import numpy as np

from core.errors import DicomInputError

_TOL = 1.01


def wrap(phase_rad: np.ndarray) -> np.ndarray:
    """Wrap to [-pi, pi) as float32 (values that round up to float32(pi) become -float32(pi)).

    Values already in [-pi, pi) (every scanner's phase: wrapping is for sums and differences) are
    only cast, which skips the float64 modulo (2 s for a 1 mm 4-echo study)."""
    v = np.asarray(phase_rad, dtype=np.float64)
    if v.size and float(v.min()) >= -np.pi and float(v.max()) < np.pi:
        out = v.astype(np.float32)
    else:
        out = (np.mod(v + np.pi, 2.0 * np.pi) - np.pi).astype(np.float32)
    out[out >= np.float32(np.pi)] = -np.float32(np.pi)
    return out


def phase_to_radians(
    rescaled: np.ndarray,
    *,
    manufacturer: str,
    rescale_type: str | None = None,
    slopes_intercepts: set[tuple[float, float]] | None = None,
) -> tuple[np.ndarray, str]:
    """Convert a stack of rescaled phase values to wrapped radians.

    Args:
        rescaled: stored * RescaleSlope + RescaleIntercept, any shape, all frames of one stack.
        manufacturer: Manufacturer (0008,0070) of the stack.
        rescale_type: RescaleType if the frames carry one (the same on all frames), else ``None``.
        slopes_intercepts: the distinct (RescaleSlope, RescaleIntercept) pairs of the stack.

    Returns:
        ``(radians float32 in [-pi, pi), description of the rule applied)``.

    Raises:
        DicomInputError: the values are in no recognised range, or disagree with RescaleType.
    """
    v = np.asarray(rescaled, dtype=np.float64)
    if v.size == 0:
        raise DicomInputError("phase series has no pixels")
    if not np.all(np.isfinite(v)):
        raise DicomInputError("phase series holds non-finite values")
    lo, hi = float(v.min()), float(v.max())
    span = f"{lo:.6g}..{hi:.6g}"
    pairs = slopes_intercepts or set()
    maker = (manufacturer or "").upper()

    if "SIEMENS" in maker:
        if pairs == {(2.0, -4096.0)} or (lo >= -4096 * _TOL and hi <= 4096 * _TOL and lo < 0 and hi - lo > 2 * np.pi * _TOL):
            if lo < -4096 * _TOL or hi > 4096 * _TOL:
                raise DicomInputError(f"unknown phase scaling: Siemens phase values {span} outside -4096..4095")
            return wrap(v * (np.pi / 4096.0)), "siemens: rescaled (stored*2-4096) * pi/4096"
        if pairs <= {(1.0, 0.0)} and lo >= 0 and hi <= 4095 and hi > 2 * np.pi * _TOL:
            return wrap((v - 2048.0) * (np.pi / 2048.0)), "siemens: stored 0..4095, (v-2048) * pi/2048"

    unit = (rescale_type or "").strip().lower()
    if unit in ("rad", "radian", "radians"):
        if lo < -2 * np.pi * _TOL or hi > 2 * np.pi * _TOL:
            raise DicomInputError(f"unknown phase scaling: RescaleType says radians but values span {span}")
        return wrap(v), "rescaled phase in radians (RescaleType rad)"
    if unit in ("mrad", "milliradian", "milliradians"):
        if lo < -2000 * np.pi * _TOL or hi > 2000 * np.pi * _TOL:
            raise DicomInputError(f"unknown phase scaling: RescaleType says mrad but values span {span}")
        return wrap(v * 1e-3), "rescaled phase in milliradians (RescaleType mrad) * 1e-3"

    def within(a: float, b: float) -> bool:
        margin = (b - a) * (_TOL - 1.0) / 2.0
        return lo >= a - margin and hi <= b + margin

    if within(-np.pi, np.pi) or within(0.0, 2 * np.pi):
        return wrap(v), f"rescaled phase in radians (range {span})"
    if within(-1000 * np.pi, 1000 * np.pi) or within(0.0, 2000 * np.pi):
        return wrap(v * 1e-3), f"rescaled phase in milliradians (range {span}) * 1e-3"
    raise DicomInputError(
        f"unknown phase scaling: rescaled phase values span {span}, neither radians nor milliradians"
        f" ({maker or 'unknown manufacturer'})"
    )
