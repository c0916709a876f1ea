"""The digital head of the simulator: anatomy, susceptibility, relaxation and focal lesions.

:func:`simulate_subject` builds one subject, deterministic per ``seed``:

1. **Anatomy.** A random subject transform (rotation of a few degrees, per-axis scale 0.92-1.08,
   translation of a few mm, plus a smooth random elastic displacement, amplitude ~2 mm,
   wavelengths 50-100 mm) maps each acquisition voxel (LPS) to MNI (RAS: ``x_ras = -x_lps``,
   ``y_ras = -y_lps``). The MNI152 templates (:mod:`training.sim.anatomy`) are pulled through it:
   trilinear for probabilities, nearest for atlas labels and MARS regions.
2. **The head outside the brain**, from the signed distance to the closed brain hull: a 2-3 mm
   CSF layer, a 5.5-7.5 mm skull, 5-8 mm of scalp; a face/neck soft-tissue region below the brain;
   air cavities (frontal, ethmoid, sphenoid, maxillary sinuses, nasal cavity, pharynx, ear canals,
   mastoid air) as ellipsoids; air outside. Susceptibilities relative to water (= CSF = 0):
   air +9.4 ppm; skull -2.0 ppm (cortical bone is about -2.2 ppm, marrow in the diploe slightly
   positive; one value for the whole skull); scalp and soft tissue 0 (fat chemical shift not
   modelled).
3. **Brain susceptibility** (ppm relative to CSF): WM -0.03, cortical GM +0.02, deep grey iron
   (pallidum 0.18, substantia nigra 0.14, red nucleus 0.12, dentate 0.10, putamen 0.08, caudate
   0.06, thalamus 0.03), each scaled by a per-subject factor 0.8-1.2. Veins (deoxygenated blood,
   0.30-0.45 ppm) as partial-volume tubes: superior sagittal sinus, straight and transverse
   sinuses, internal cerebral veins, cortical veins along the surface draining to the sinus, and
   deep medullary veins running radially from the lateral ventricles through the white matter.
4. **Lesions.** Microbleeds: partial-volume spheres, diameter 2-10 mm (2 + 8 * Beta(1.3, 3.5):
   mostly small), chi 0.2-1.5 ppm, R2* 250-800 1/s; MARS category lobar 60 %, deep 30 %,
   infratentorial 10 % (from the MARS volume sampled on the subject grid); centres at least 6 mm
   inside the brain, not in CSF, 2 mm or more away from veins and from other lesions; within a
   category the region is drawn with :data:`CMB_REGION_WEIGHTS` (deep: mostly basal ganglia and
   thalamus), then a voxel uniformly within it.
   Calcifications (diamagnetic mimics, also in controls): -0.3 to -1.2 ppm, 2-8 mm, 0-3 per subject,
   at the choroid plexus, the pineal gland, the globus pallidus or a random brain position.
5. **Acquisition** (:mod:`training.sim.acquire`) on the acquisition grid extended 48 mm below and
   16 mm above the field of view (neck and vertex continue outside the slab, so the dipole field
   at the slab's edges is not that of a truncated head).

Relaxation at 3 T (R2*, 1/s; scaled linearly with B0 above a 3 1/s floor for other field
strengths): CSF 3, cortical GM 16, WM 21, caudate 22, thalamus 21, putamen 28, pallidum 40,
substantia nigra 38, red nucleus 34, dentate 30, veins 45, skull 600, scalp/soft tissue 30.
S0 (arbitrary units, a scanner-like range so the magnitude fits unsigned 16 bit): CSF 1000,
GM 850, WM 720, deep grey 800, veins 800, microbleed 400, calcification 300, skull 50, scalp 800.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core import mars
from core.errors import ConfigError
from core.geometry import Geometry
from training.sim import acquire, anatomy, family as fam
from training.sim.study import Acquisition, Lesion, SimulatedStudy

DEFAULT_ECHO_TIMES_S: tuple[float, ...] = (0.006, 0.012, 0.018, 0.024)
SINGLE_ECHO_TIME_S: float = 0.023
DEFAULT_FOV_MM: tuple[float, float, float] = (200.0, 232.0, 176.0)
BRAIN_CENTRE_MNI: tuple[float, float, float] = (0.0, -18.0, 8.0)
EXTEND_BELOW_MM = 48.0
EXTEND_ABOVE_MM = 16.0

CHI_WM, CHI_GM = -0.03, 0.02
CHI_BONE = -2.0
CHI_DEEP = {
    "pallidum": 0.18,
    "substantia_nigra": 0.14,
    "red_nucleus": 0.12,
    "dentate": 0.10,
    "putamen": 0.08,
    "caudate": 0.06,
    "thalamus": 0.03,
}
R2S_3T = {
    "csf": 3.0,
    "gm": 16.0,
    "wm": 21.0,
    "caudate": 22.0,
    "thalamus": 21.0,
    "putamen": 28.0,
    "pallidum": 40.0,
    "substantia_nigra": 38.0,
    "red_nucleus": 34.0,
    "dentate": 30.0,
    "vein": 45.0,
    "bone": 600.0,
    "soft": 30.0,
}
S0 = {"csf": 1000.0, "gm": 850.0, "wm": 720.0, "deep": 800.0, "vein": 800.0, "cmb": 400.0,
      "calc": 300.0, "bone": 50.0, "soft": 800.0}
CMB_CATEGORY_P = {"lobar": 0.6, "deep": 0.3, "infratentorial": 0.1}
# Region weights within a category. Lobar: by volume (lobar microbleeds of amyloid angiopathy
# spread over the cortex). Deep and infratentorial (hypertensive arteriopathy): mostly basal
# ganglia, thalamus, pons and cerebellum, fewer in the white matter.
CMB_REGION_WEIGHTS: dict[str, float | None] = {
    "frontal": None, "parietal": None, "temporal": None, "occipital": None, "insula": None,
    "basal_ganglia": 0.35, "thalamus": 0.30, "internal_capsule": 0.08, "external_capsule": 0.07,
    "corpus_callosum": 0.05, "deep_periventricular_wm": 0.15,
    "brainstem": 0.5, "cerebellum": 0.5,
}
MIN_DEPTH_MM = 6.0
DEEP_LABELS = (("caudate", ("Caudate",)), ("putamen", ("Putamen",)), ("pallidum", ("Pallidum",)),
               ("thalamus", ("Thalamus_Proper",)))


# --------------------------------------------------------------------------- subject transform


@dataclass(frozen=True)
class SubjectTransform:
    """Maps subject patient coordinates (LPS mm) to MNI152 (RAS mm).

    ``ras_mni = c + M (q - c) + t + u(q)``, ``q = flip(lps - offset)``, where ``flip`` negates x and y,
    ``M`` is rotation times scale, ``u`` a sum of smooth sinusoidal displacements.
    """

    offset_lps: np.ndarray
    centre: np.ndarray
    matrix: np.ndarray
    translation: np.ndarray
    wave_k: np.ndarray  # (n, 3) rad/mm
    wave_amp: np.ndarray  # (n, 3) mm
    wave_phase: np.ndarray  # (n,)

    @classmethod
    def random(cls, rng: np.random.Generator, *, elastic_mm: float = 2.0) -> "SubjectTransform":
        ang = np.deg2rad(rng.uniform(-4.0, 4.0, size=3))
        cx, cy, cz = np.cos(ang)
        sx, sy, sz = np.sin(ang)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        base = rng.uniform(0.94, 1.06)
        scale = np.clip(base * rng.uniform(0.97, 1.03, size=3), 0.92, 1.08)
        # M maps subject -> MNI, so a subject bigger than MNI has scale < 1 here
        matrix = rz @ ry @ rx @ np.diag(1.0 / scale)
        n = 6
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        wavelength = rng.uniform(50.0, 100.0, size=n)
        wave_k = dirs * (2 * np.pi / wavelength)[:, None]
        wave_amp = rng.normal(size=(n, 3)) * elastic_mm / np.sqrt(n)
        return cls(
            offset_lps=np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), rng.uniform(-25, 25)]),
            centre=np.asarray(BRAIN_CENTRE_MNI, dtype=np.float64),
            matrix=matrix,
            translation=rng.uniform(-3.0, 3.0, size=3),
            wave_k=wave_k,
            wave_amp=wave_amp,
            wave_phase=rng.uniform(0, 2 * np.pi, size=n),
        )

    @property
    def scale(self) -> float:
        """Mean linear size of the subject relative to MNI."""
        return float(np.abs(np.linalg.det(self.matrix)) ** (-1.0 / 3.0))

    def _u(self, q: np.ndarray) -> np.ndarray:
        """Elastic displacement (mm) at subject-RAS points ``q`` of shape (3, ...)."""
        out = np.zeros_like(q, dtype=np.float64)
        for k, a, ph in zip(self.wave_k, self.wave_amp, self.wave_phase):
            s = np.sin(np.tensordot(k, q, axes=(0, 0)) + ph)
            out += a.reshape((3,) + (1,) * (q.ndim - 1)) * s
        return out

    def to_mni(self, lps: np.ndarray) -> np.ndarray:
        """LPS points (3, ...) -> MNI RAS (3, ...)."""
        lps = np.asarray(lps, dtype=np.float64)
        shp = (3,) + (1,) * (lps.ndim - 1)
        q = (lps - self.offset_lps.reshape(shp)) * np.array([-1.0, -1.0, 1.0]).reshape(shp)
        c = self.centre.reshape(shp)
        lin = np.tensordot(self.matrix, q - c, axes=(1, 0)) + c + self.translation.reshape(shp)
        return lin + self._u(q)

    def from_mni(self, ras: np.ndarray, iterations: int = 8) -> np.ndarray:
        """MNI RAS points (3, ...) -> LPS (3, ...) by fixed-point inversion of :meth:`to_mni`."""
        ras = np.asarray(ras, dtype=np.float64)
        shp = (3,) + (1,) * (ras.ndim - 1)
        c = self.centre.reshape(shp)
        minv = np.linalg.inv(self.matrix)
        q = np.tensordot(minv, ras - c - self.translation.reshape(shp), axes=(1, 0)) + c
        for _ in range(iterations):
            q = np.tensordot(minv, ras - c - self.translation.reshape(shp) - self._u(q), axes=(1, 0)) + c
        return q * np.array([-1.0, -1.0, 1.0]).reshape(shp) + self.offset_lps.reshape(shp)


def mni_coordinates(geometry: Geometry, transform: SubjectTransform, step: int = 4) -> np.ndarray:
    """MNI RAS coordinates (3, i, j, k) float32 of every voxel of ``geometry``.

    Evaluated exactly on a lattice every ``step`` voxels and interpolated linearly (the affine part
    is exact; the elastic part has wavelengths >= 50 mm).
    """
    pts, _ = acquire.lattice_points(geometry.shape, step)
    lps = np.tensordot(geometry.affine[:3, :3], pts, axes=(1, 0)) + geometry.affine[:3, 3].reshape(3, 1, 1, 1)
    ras = transform.to_mni(lps)
    return acquire.upsample_linear(ras, geometry.shape, step)


# --------------------------------------------------------------------------- rasterising shapes


def _box(geometry: Geometry, centre_lps: np.ndarray, radius_mm: float) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Voxel box around a point and the LPS coordinates (3, a, b, c) of its voxels."""
    box = fam.voxel_box(geometry, centre_lps, radius_mm)
    if box is None:
        return None
    sl, idx = box
    lps = np.tensordot(geometry.affine[:3, :3], idx, axes=(1, 0)) + geometry.affine[:3, 3].reshape(3, 1, 1, 1)
    return sl, lps


def _pv(distance_mm: np.ndarray, radius_mm: float, h: float) -> np.ndarray:
    """Partial-volume fraction of a voxel (half-size ``h``) at a distance from a surface."""
    if radius_mm >= h:
        return np.clip((radius_mm + h - distance_mm) / (2 * h), 0.0, 1.0)
    return np.clip((2 * h - distance_mm) / (2 * h), 0.0, 1.0) * (radius_mm / h) ** 2


def rasterise_tube(
    frac: np.ndarray,
    geometry: Geometry,
    points_lps: np.ndarray,
    radius_mm: float,
    *,
    values: np.ndarray | None = None,
    value: float = 0.0,
) -> None:
    """Max-combine the partial-volume fraction of a tube along a polyline (3, n) into ``frac``.

    Where this tube raises the fraction, ``values`` (if given) is set to ``value``.
    """
    h = 0.5 * min(geometry.spacing)
    for a, b in zip(points_lps.T[:-1], points_lps.T[1:]):
        mid = 0.5 * (a + b)
        half_len = 0.5 * float(np.linalg.norm(b - a))
        box = _box(geometry, mid, half_len + radius_mm + 2 * h)
        if box is None:
            continue
        sl, p = box
        ab = b - a
        L2 = float(ab @ ab)
        rel = p - a.reshape(3, 1, 1, 1)
        t = np.clip(np.tensordot(ab, rel, axes=(0, 0)) / L2, 0, 1) if L2 > 0 else np.zeros(rel.shape[1:])
        d = np.linalg.norm(rel - ab.reshape(3, 1, 1, 1) * t, axis=0)
        f = _pv(d, radius_mm, h).astype(np.float32)
        if values is not None:
            sub = values[sl]
            sub[f > frac[sl]] = value
        np.maximum(frac[sl], f, out=frac[sl])


def sphere_fraction(geometry: Geometry, centre_lps: np.ndarray, radius_mm: float):
    """(box slices, partial-volume fraction) of a sphere, or None outside the grid."""
    h = 0.5 * min(geometry.spacing)
    box = _box(geometry, centre_lps, radius_mm + 2 * h)
    if box is None:
        return None
    sl, p = box
    d = np.linalg.norm(p - np.asarray(centre_lps).reshape(3, 1, 1, 1), axis=0)
    return sl, _pv(d, radius_mm, h).astype(np.float32)


# --------------------------------------------------------------------------- veins in MNI space


def _surface_point(T: anatomy.MniTemplates, direction: np.ndarray, level_mm: float,
                   origin=(0.0, -20.0, 10.0)) -> np.ndarray | None:
    """First point along rays from ``origin`` where the hull signed distance reaches ``level_mm``.

    ``direction`` is (3,) or (3, n); returns (3,) or (3, n) (NaN where never reached).
    """
    d = np.asarray(direction, dtype=np.float64)
    single = d.ndim == 1
    if single:
        d = d[:, None]
    d = d / np.linalg.norm(d, axis=0, keepdims=True)
    r = np.arange(10.0, 140.0, 0.5)
    o = np.asarray(origin, dtype=np.float64).reshape(3, 1, 1)
    pts = o + d[:, :, None] * r[None, None, :]  # (3, n, m)
    sd = anatomy.sample(T.hull_sd_mm, T.hull_affine, pts.reshape(3, -1), order=1, cval=99.0).reshape(pts.shape[1:])
    hit = sd >= level_mm
    first = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    out = np.full((3, d.shape[1]), np.nan)
    ok = first >= 0
    out[:, ok] = pts[:, ok, first[ok]]
    return out[:, 0] if single else out


def venous_polylines(rng: np.random.Generator) -> list[tuple[str, np.ndarray, float, float]]:
    """Veins as (name, MNI points (3, n), radius mm, chi ppm)."""
    T = anatomy.load_templates()
    out: list[tuple[str, np.ndarray, float, float]] = []

    def chi_vein() -> float:
        return float(rng.uniform(0.30, 0.45))

    # superior sagittal sinus: midline, just outside the brain hull, frontal to torcula
    ang = np.deg2rad(np.linspace(35.0, 188.0, 40))
    dirs = np.stack([np.zeros_like(ang), np.cos(ang), np.sin(ang)])
    pts = _surface_point(T, dirs, 3.5)
    pts = pts[:, ~np.isnan(pts[0])]
    pts = np.concatenate([pts, np.asarray(anatomy.TORCULA).reshape(3, 1)], axis=1)
    out.append(("superior_sagittal_sinus", pts, float(rng.uniform(3.0, 4.0)), chi_vein()))
    for name, poly, radius in anatomy.VENOUS_TREES:
        out.append((name, np.asarray(poly, dtype=np.float64).T, radius * float(rng.uniform(0.85, 1.15)), chi_vein()))

    # cortical veins: from the lateral convexity up to the midline along the surface
    for n in range(int(rng.integers(10, 17))):
        side = 1.0 if n % 2 == 0 else -1.0
        az = rng.uniform(np.deg2rad(-150), np.deg2rad(60))  # angle in the axial plane from +y
        el = rng.uniform(np.deg2rad(-5), np.deg2rad(35))
        start = np.array([side * np.cos(el) * abs(np.sin(az)) + side * 0.3, np.cos(el) * np.cos(az), np.sin(el)])
        target = np.array([0.0, start[1] * 0.6 + rng.normal(0, 0.15), 1.0])
        start /= np.linalg.norm(start)
        target /= np.linalg.norm(target)
        steps = np.linspace(0.0, 1.0, 24)[:, None]
        wig = np.cumsum(rng.normal(0, 0.04, size=(24, 3)), axis=0)
        dirs = ((1 - steps) * start + steps * target + wig * np.sin(np.pi * steps)).T
        pts = _surface_point(T, dirs, -0.8)
        keep = ~np.isnan(pts[0])
        pts = pts[:, keep]
        pts = pts[:, np.abs(pts[0]) >= 4.0]
        if pts.shape[1] >= 3:
            out.append((f"cortical_vein_{n}", pts, float(rng.uniform(0.6, 1.5)), chi_vein()))

    # deep medullary veins: radially from the lateral ventricle wall through the white matter
    vent_ids = T.label_ids("Lateral_Ventricle")
    vox = np.argwhere(np.isin(T.atlas.labels, vent_ids))
    ras = T.atlas.voxel_to_ras(vox)
    ras = ras[(ras[:, 2] > 0.0) & (ras[:, 2] < 28.0)]
    for n in range(int(rng.integers(24, 41))):
        p0 = ras[rng.integers(len(ras))]
        side = np.sign(p0[0]) or 1.0
        d = np.array([side * 1.0, rng.normal(0, 0.35), 0.5 + rng.normal(0, 0.3)])
        d /= np.linalg.norm(d)
        length = rng.uniform(12.0, 28.0)
        bend = rng.normal(0, 0.15, size=3)
        s = np.linspace(0, 1, 5)
        pts = p0[:, None] + (d[:, None] * s + bend[:, None] * s**2) * length
        wm = anatomy.sample(T.wm + T.gm, T.affine, pts, order=1)
        keep = np.ones(pts.shape[1], dtype=bool)  # the first point is on the ventricle wall
        keep[1:] = np.cumprod(wm[1:] > 0.5) > 0
        pts = pts[:, keep]
        if pts.shape[1] >= 2:
            out.append((f"medullary_vein_{n}", pts, float(rng.uniform(0.35, 0.7)), chi_vein()))
    return out


# --------------------------------------------------------------------------- the subject


def default_shape(voxel_mm: Sequence[float], fov_mm: Sequence[float] = DEFAULT_FOV_MM) -> tuple[int, int, int]:
    """Matrix covering the default field of view (200 x 232 x 176 mm) at a voxel size."""
    return tuple(int(round(f / v)) for f, v in zip(fov_mm, voxel_mm))


def _ellipsoid(ras: np.ndarray, centre, semi) -> np.ndarray:
    acc = np.zeros(ras.shape[1:], dtype=np.float32)
    for a in range(3):
        acc += ((ras[a] - np.float32(centre[a])) / np.float32(semi[a])) ** 2
    return acc <= 1.0


def _r2s(name: str, b0_t: float) -> float:
    return 3.0 + (R2S_3T[name] - 3.0) * b0_t / 3.0


def _blend(chi, r2s, s0, res, chi_val, r2_val, s0_val) -> None:
    """Mix a lesion's values into the maps by its partial-volume fraction ``res`` = (slices, f)."""
    if res is None:
        return
    sl, f = res
    chi[sl] = (1 - f) * chi[sl] + f * chi_val
    r2s[sl] = (1 - f) * r2s[sl] + f * r2_val
    s0[sl] = (1 - f) * s0[sl] + f * s0_val


def _place_sphere(chi, r2s, s0, geometry, centre, radius, chi_val, r2_val, s0_val) -> None:
    _blend(chi, r2s, s0, sphere_fraction(geometry, centre, radius), chi_val, r2_val, s0_val)


def _place_shape(chi, r2s, s0, geometry, centre, shape, chi_val, r2_val, s0_val) -> None:
    _blend(chi, r2s, s0, fam.shape_fraction(geometry, centre, shape), chi_val, r2_val, s0_val)


def simulate_subject(
    subject_id: str,
    seed: int,
    *,
    shape: Sequence[int] | None = None,
    voxel_mm: Sequence[float] = (1.0, 1.0, 1.0),
    tilt_deg: float = 0.0,
    echo_times_s: Sequence[float] = DEFAULT_ECHO_TIMES_S,
    field_strength_t: float = 3.0,
    snr: float = 40.0,
    n_cmb: int | None = None,
    control: bool = False,
    n_calc: int | None = None,
    cmb_categories: Sequence[str] | None = None,
    cmb_diameter_mm: tuple[float, float] | None = None,
    cmb_chi_ppm: tuple[float, float] | None = None,
    pad_factor: float = 1.5,
    timings: dict | None = None,
    family: str = "default",
    family_ranges: "fam.RandomisedRanges | None" = None,
) -> SimulatedStudy:
    """Simulate one subject's multi-echo GRE study with ground truth.

    Args:
        subject_id: identifier stored in the study.
        seed: all randomness derives from it (same seed and arguments -> identical arrays).
        shape: matrix (i, j, k); default covers 200 x 232 x 176 mm at ``voxel_mm``.
        voxel_mm: voxel size (mm) along i, j, k.
        tilt_deg: slab angulation about the left-right axis.
        echo_times_s: echo times (s); default 6/12/18/24 ms (:data:`SINGLE_ECHO_TIME_S` for one).
        field_strength_t: B0 (T).
        snr: first-echo mean brain magnitude over noise sigma.
        n_cmb: number of microbleeds; ``None`` -> random 0-15; forced to 0 for controls.
        control: a control subject (no microbleeds; calcifications still possible).
        n_calc: number of calcifications; ``None`` -> random 0-3.
        cmb_categories: optional MARS category per microbleed (overrides the 60/30/10 draw; tests).
        cmb_diameter_mm: optional (min, max) uniform diameter range instead of the skewed 2-10 mm.
        cmb_chi_ppm: optional (min, max) susceptibility range instead of 0.2-1.5 ppm.
        pad_factor: zero padding of the dipole convolution.
        timings: if a dict is given, seconds per stage are written into it.
        family: phantom family (:data:`training.sim.family.FAMILIES`). ``"default"``: the fixed
            choices above. ``"randomised"``: :func:`training.sim.family.draw_subject_params` draws
            voxel size and matrix (``voxel_mm`` and ``shape`` are then ignored), echo times, field
            strength and SNR (``echo_times_s``, ``field_strength_t``, ``snr`` ignored), tissue,
            vein and lesion susceptibilities, lesion R2* and shapes from ``seed``;
            ``cmb_chi_ppm`` / ``cmb_diameter_mm`` still override when given.
        family_ranges: the randomised family's ranges (default :class:`~training.sim.family.RandomisedRanges`).

    Returns:
        The study; ``lesions`` may hold fewer microbleeds / calcifications than asked when no free
        position was found in 200 tries (only happens on very coarse or tiny grids).

    Raises:
        ConfigError: invalid voxel size, echo times, SNR or field strength.
    """
    if family not in fam.FAMILIES:
        raise ConfigError(f"unknown phantom family {family!r}; known: {', '.join(fam.FAMILIES)}")
    fp = frng = None
    if family == "randomised":
        fp = fam.draw_subject_params(seed, family_ranges)
        frng = fam.family_rng(seed, stream=1)  # per-vein and per-lesion draws
        voxel_mm, shape = fp.voxel_mm, fp.shape
        echo_times_s, field_strength_t, snr = fp.echo_times_s, fp.field_strength_t, fp.snr
    if len(voxel_mm) != 3 or min(voxel_mm) <= 0:
        raise ConfigError(f"voxel size must be three positive numbers in mm, got {tuple(voxel_mm)}")
    if not len(echo_times_s) or min(echo_times_s) <= 0 or max(echo_times_s) > 0.2:
        raise ConfigError(f"echo times must be positive and given in seconds, got {list(echo_times_s)}")
    if snr <= 0 or field_strength_t <= 0:
        raise ConfigError("SNR and field strength must be positive")
    tick = time.perf_counter()
    tm = {} if timings is None else timings
    rng = np.random.default_rng(seed)
    T = anatomy.load_templates()
    tm["templates_s"] = time.perf_counter() - tick

    # ---------------------------------------------------------------- geometry
    voxel = tuple(float(v) for v in voxel_mm)
    shape = tuple(int(n) for n in (shape or default_shape(voxel)))
    xf = SubjectTransform.random(rng)
    centre_lps = np.array([-BRAIN_CENTRE_MNI[0], -BRAIN_CENTRE_MNI[1], BRAIN_CENTRE_MNI[2]]) + xf.offset_lps
    centre_lps = centre_lps + rng.uniform(-3, 3, size=3)
    geom = Geometry.oblique(shape, voxel, tilt_deg, centre_lps)
    n_below = int(np.ceil(EXTEND_BELOW_MM / voxel[2]))
    n_above = int(np.ceil(EXTEND_ABOVE_MM / voxel[2]))
    ext_shape = (shape[0], shape[1], shape[2] + n_below + n_above)
    ext_aff = geom.affine.copy()
    ext_aff[:3, 3] = geom.voxel_to_patient([0.0, 0.0, -float(n_below)])
    ext = Geometry(ext_shape, ext_aff)
    fov = (slice(None), slice(None), slice(n_below, n_below + shape[2]))

    # ---------------------------------------------------------------- anatomy sampling
    t0 = time.perf_counter()
    ras = mni_coordinates(ext, xf)
    flat = ras.reshape(3, -1)
    sd = anatomy.sample(T.hull_sd_mm, T.hull_affine, flat, order=1, cval=99.0).reshape(ext_shape)
    inb = np.flatnonzero(sd.ravel() < 1.5)
    pts = flat[:, inb]

    def samp(vol, order, aff=None):
        return anatomy.sample(vol, T.affine if aff is None else aff, pts, order=order)

    pb = samp(T.brain, 1)
    gm = samp(T.gm, 1)
    wm = samp(T.wm, 1)
    depth = samp(T.depth_mm, 1) * np.float32(xf.scale)
    mreg = samp(T.mars_region, 0, T.atlas.affine).astype(np.uint8)
    mside = samp(T.mars_side, 0, T.atlas.affine).astype(np.uint8)
    tm["anatomy_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- tissue properties
    t0 = time.perf_counter()
    b0 = float(field_strength_t)
    t_csf = rng.uniform(2.0, 3.0)
    t_bone = t_csf + rng.uniform(5.5, 7.5)
    t_scalp = t_bone + rng.uniform(5.0, 8.0)
    x, y, z = ras[0], ras[1], ras[2]
    # face / neck soft tissue below the brain
    zc = np.clip((z + 105.0) / 20.0, 0.0, 1.0)  # 0 at/below z=-105 (neck), 1 at/above z=-85 (face)
    yc = -15.0 + 23.0 * zc
    ax_ = 55.0 + 13.0 * zc
    by_ = 52.0 + 30.0 * zc
    neck = (z <= -20.0) & ((x / ax_) ** 2 + ((y - yc) / by_) ** 2 <= 1.0)
    del zc, yc, ax_, by_
    head = (sd <= t_scalp) | neck
    air = ~head
    for _name, c, semi in anatomy.AIR_CAVITIES:
        air |= _ellipsoid(ras, c, semi) & (sd > t_csf)

    chi = np.zeros(ext_shape, dtype=np.float32)
    r2s = np.zeros(ext_shape, dtype=np.float32)
    s0 = np.zeros(ext_shape, dtype=np.float32)
    soft = head & (sd > t_bone)
    bone = head & (sd > t_csf) & (sd <= t_bone)
    csf_layer = head & (sd <= t_csf)
    s0_jit = {k: v * rng.uniform(0.95, 1.05) for k, v in S0.items()}
    r2_jit = {k: _r2s(k, b0) * rng.uniform(0.9, 1.1) for k in R2S_3T}
    chi_scale = rng.uniform(0.8, 1.2)
    chi[bone] = CHI_BONE
    r2s[bone], s0[bone] = r2_jit["bone"], s0_jit["bone"]
    r2s[soft], s0[soft] = r2_jit["soft"], s0_jit["soft"]
    r2s[csf_layer], s0[csf_layer] = r2_jit["csf"], s0_jit["csf"]
    del soft, bone

    # brain: gm / wm / csf mixture (the part of a voxel that is not brain is CSF)
    csf_p = np.clip(1.0 - gm - wm, 0.0, 1.0)
    chi_gm = CHI_GM * rng.uniform(0.8, 1.2)
    chi_wm = CHI_WM * rng.uniform(0.8, 1.2)
    if fp is not None:
        chi_gm, chi_wm = fp.chi_gm, fp.chi_wm
    chi_b = gm * np.float32(chi_gm) + wm * np.float32(chi_wm)
    if fp is not None:  # CSF relative to water, in the brain voxels' CSF share and the CSF layer
        chi_b += csf_p * np.float32(fp.chi_csf)
        chi[csf_layer] = fp.chi_csf
    r2_b = gm * r2_jit["gm"] + wm * r2_jit["wm"] + csf_p * r2_jit["csf"]
    s0_b = gm * s0_jit["gm"] + wm * s0_jit["wm"] + csf_p * s0_jit["csf"]
    deep_codes = np.zeros(len(inb), dtype=np.uint8)
    iron = {k: CHI_DEEP[k] * chi_scale * rng.uniform(0.9, 1.1) for k in CHI_DEEP}
    if fp is not None:
        iron = dict(fp.chi_deep)
    # deep grey nuclei with partial volume: trilinear one-hot of the atlas labels, soft-edged
    # ellipsoids for the nuclei the atlas does not separate
    near = (np.abs(pts[0]) < 40.0) & (pts[1] > -70.0) & (pts[1] < 40.0) & (pts[2] > -50.0) & (pts[2] < 35.0)
    near_idx = np.flatnonzero(near & (pb > 0.0))
    sub_pts = pts[:, near_idx]
    fractions: list[tuple[str, np.ndarray]] = []
    for name, bases in DEEP_LABELS:
        onehot = np.isin(T.atlas.labels, T.label_ids(*bases)).astype(np.float32)
        fractions.append((name, anatomy.sample(onehot, T.atlas.affine, sub_pts, order=1)))
    vox_mm = float(np.mean(voxel))
    for name, c, semi in anatomy.IRON_NUCLEI:
        e = np.zeros(len(near_idx), dtype=np.float32)
        for a in range(3):
            e += ((sub_pts[a] - np.float32(c[a])) / np.float32(semi[a])) ** 2
        depth_in = (1.0 - np.sqrt(e)) * np.float32(min(semi))  # ~mm inside the surface
        fractions.append((name.rsplit("_", 1)[0], np.clip(depth_in / vox_mm + 0.5, 0.0, 1.0)))
    for key, f in fractions:
        if not f.any():
            continue
        chi_b[near_idx] += f * (np.float32(iron[key]) - chi_b[near_idx])
        r2_b[near_idx] += f * (np.float32(r2_jit[key]) - r2_b[near_idx])
        s0_b[near_idx] += f * (np.float32(s0_jit["deep"]) - s0_b[near_idx])
        deep_codes[near_idx[(f >= 0.5) & (pb[near_idx] > 0.5)]] = anatomy.DEEP_GM_CODES[key]
    flat_chi, flat_r2, flat_s0 = chi.reshape(-1), r2s.reshape(-1), s0.reshape(-1)
    inside_hull = sd.reshape(-1)[inb] <= 0.0
    in_brainish = inside_hull | (pb > 0.0)
    sel = inb[in_brainish]
    w = pb[in_brainish]
    flat_chi[sel] = w * chi_b[in_brainish]  # remainder of the voxel: CSF (chi 0)
    if fp is not None:
        flat_chi[sel] += (1 - w) * np.float32(fp.chi_csf)
    flat_r2[sel] = w * r2_b[in_brainish] + (1 - w) * r2_jit["csf"]
    flat_s0[sel] = w * s0_b[in_brainish] + (1 - w) * s0_jit["csf"]

    def full(values, dtype, fill=0):
        out = np.full(ext.n_voxels, fill, dtype=dtype)
        out[inb] = values
        return out.reshape(ext_shape)

    brain_ext = full(pb >= 0.5, bool)
    depth_ext = full(depth, np.float32)
    mreg_ext = full(mreg, np.uint8)
    mside_ext = full(mside, np.uint8)
    deep_ext = full(deep_codes, np.uint8)
    csfp_ext = full(csf_p, np.float32, 1.0)
    del gm, wm, chi_b, r2_b, s0_b, csf_p
    tm["tissue_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- veins
    t0 = time.perf_counter()
    vein_frac = np.zeros(ext_shape, dtype=np.float32)
    vein_chi = np.zeros(ext_shape, dtype=np.float32)
    vein_spread = (family_ranges or fam.RandomisedRanges()).venous_saturation_per_vein
    for _name, poly, radius, chi_v in venous_polylines(rng):
        if fp is not None:
            chi_v = fam.vein_chi(frng, fp, vein_spread)
        rasterise_tube(vein_frac, ext, xf.from_mni(poly), radius, values=vein_chi, value=chi_v)
    vf = vein_frac
    chi[:] = (1 - vf) * chi + vf * vein_chi
    r2s[:] = (1 - vf) * r2s + vf * r2_jit["vein"]
    s0[:] = (1 - vf) * s0 + vf * s0_jit["vein"]
    tm["veins_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- lesions
    t0 = time.perf_counter()
    n_c = 0 if control else (int(rng.integers(0, 16)) if n_cmb is None else int(n_cmb))
    n_k = int(rng.integers(0, 4)) if n_calc is None else int(n_calc)
    lesions: list[Lesion] = []
    taken: list[tuple[np.ndarray, float]] = []
    kz = np.arange(ext_shape[2])
    in_fov_k = (kz >= n_below + 3) & (kz < n_below + shape[2] - 3)
    base_ok = brain_ext & (depth_ext >= MIN_DEPTH_MM) & (csfp_ext < 0.5) & (vein_frac == 0)
    base_ok &= in_fov_k[None, None, :]
    ok_regions = np.where(base_ok, mreg_ext, 0).ravel()
    del base_ok
    order = np.argsort(ok_regions, kind="stable")
    bounds = np.searchsorted(ok_regions[order], np.arange(len(mars.MARS_REGIONS) + 2))
    cand_by_region = {r.key: order[bounds[r.index]:bounds[r.index + 1]] for r in mars.MARS_REGIONS}
    del ok_regions, order

    def region_weights(cat: str) -> tuple[list[str], np.ndarray]:
        keys = [r.key for r in mars.MARS_REGIONS if r.category == cat and len(cand_by_region[r.key])]
        w = np.array([CMB_REGION_WEIGHTS[k] if CMB_REGION_WEIGHTS[k] is not None
                      else float(len(cand_by_region[k])) for k in keys], dtype=np.float64)
        return keys, (w / w.sum() if len(w) else w)

    def free(centre: np.ndarray, radius: float) -> bool:
        for c2, r2_ in taken:
            if np.linalg.norm(c2 - centre) < radius + r2_ + 2.0:
                return False
        box = _box(ext, centre, radius + 2.0)
        if box is None:
            return False
        return not np.any(vein_frac[box[0]] > 0)

    def describe(kind, centre, diameter, chi_v, r2_v, shape_json=None) -> Lesion:
        v_ext = ext.patient_to_voxel(centre)
        vi = tuple(int(round(c)) for c in v_ext)
        region_idx = int(mreg_ext[vi])
        side = mars.SIDE_NAMES[int(mside_ext[vi])]
        if region_idx == 0:  # nearest region voxel (calcification in a ventricle or cistern)
            box = _box(ext, centre, 8.0)
            sub = mreg_ext[box[0]]
            nz = np.argwhere(sub > 0)
            if len(nz):
                lo = np.array([s.start for s in box[0]])
                dd = np.linalg.norm((nz + lo - np.asarray(vi)) * np.asarray(ext.spacing), axis=1)
                best = tuple(nz[int(np.argmin(dd))] + lo)
                region_idx = int(mreg_ext[best])
                side = mars.SIDE_NAMES[int(mside_ext[best])]
        if not side:
            side = mars.side_from_x_ras(float(xf.to_mni(np.asarray(centre))[0]))
        reg = mars.REGION_BY_INDEX.get(region_idx)
        v_fov = geom.patient_to_voxel(centre)
        return Lesion(
            kind=kind,
            centre_lps_mm=tuple(float(c) for c in centre),
            centre_voxel=tuple(float(c) for c in v_fov),
            diameter_mm=float(diameter),
            chi_ppm=float(chi_v),
            r2star_s=float(r2_v),
            mars_region=reg.key if reg else "",
            mars_category=reg.category if reg else "",
            side=side,
            shape=shape_json,
        )

    def place(centre, diameter, lshape, chi_v, r2_v, s0_v) -> None:
        if lshape is None:
            _place_sphere(chi, r2s, s0, ext, centre, diameter / 2, chi_v, r2_v, s0_v)
        else:
            _place_shape(chi, r2s, s0, ext, centre, lshape, chi_v, r2_v, s0_v)

    def bound(diameter, lshape) -> float:
        return diameter / 2 if lshape is None else lshape.bounding_radius_mm()

    cats = list(cmb_categories) if cmb_categories is not None else None
    for n in range(n_c):
        cat = cats[n % len(cats)] if cats else str(rng.choice(mars.CATEGORIES, p=[CMB_CATEGORY_P[c] for c in mars.CATEGORIES]))
        keys, weights = region_weights(cat)
        if not keys:
            continue
        for _try in range(200):
            cand = cand_by_region[keys[int(rng.choice(len(keys), p=weights))]]
            if cmb_diameter_mm is None:
                diameter = float(2.0 + 8.0 * rng.beta(1.3, 3.5))
            else:
                diameter = float(rng.uniform(*cmb_diameter_mm))
            flat_i = int(cand[rng.integers(len(cand))])
            vox = np.array(np.unravel_index(flat_i, ext_shape), dtype=np.float64) + rng.uniform(-0.5, 0.5, 3)
            centre = ext.voxel_to_patient(vox)
            lshape = fam.draw_shape(frng, diameter, fp.shape_p) if fp is not None else None
            if free(centre, bound(diameter, lshape)):
                break
        else:
            continue
        chi_v = float(rng.uniform(*(cmb_chi_ppm or (0.2, 1.5))))
        r2_v = float(rng.uniform(250.0, 800.0)) * b0 / 3.0
        if fp is not None:
            chi_v = float(frng.uniform(*(cmb_chi_ppm or fp.cmb_chi_ppm)))
            r2_v = float(frng.uniform(*fp.cmb_r2star_3t_s)) * b0 / 3.0
        place(centre, diameter, lshape, chi_v, r2_v, s0_jit["cmb"])
        taken.append((centre, bound(diameter, lshape)))
        lesions.append(describe("cmb", centre, diameter, chi_v, r2_v, lshape.to_json() if lshape else None))

    all_brain = np.flatnonzero(brain_ext & (depth_ext >= 4.0) & in_fov_k[None, None, :])
    pall = np.flatnonzero((deep_ext == anatomy.DEEP_GM_CODES["pallidum"]) & in_fov_k[None, None, :])
    for n in range(n_k):
        for _try in range(200):
            diameter = float(rng.uniform(2.0, 8.0))
            site = rng.choice(["choroid_plexus", "pineal", "pallidum", "random"], p=[0.35, 0.2, 0.25, 0.2])
            if site == "choroid_plexus":
                c_mni = np.asarray(anatomy.CHOROID_PLEXUS[int(rng.integers(2))]) + rng.normal(0, 2.0, 3)
                centre = xf.from_mni(c_mni)
            elif site == "pineal":
                centre = xf.from_mni(np.asarray(anatomy.PINEAL) + rng.normal(0, 1.0, 3))
                diameter = min(diameter, 6.0)
            else:
                pool = pall if (site == "pallidum" and len(pall)) else all_brain
                vox = np.array(np.unravel_index(int(pool[rng.integers(len(pool))]), ext_shape), dtype=np.float64)
                centre = ext.voxel_to_patient(vox)
            vi = tuple(int(round(c)) for c in ext.patient_to_voxel(centre))
            if not all(0 <= a < b for a, b in zip(vi, ext_shape)) or not brain_ext[vi] or not in_fov_k[vi[2]]:
                continue
            lshape = fam.draw_shape(frng, diameter, fp.shape_p) if fp is not None else None
            if free(centre, bound(diameter, lshape)):
                break
        else:
            continue
        chi_v = -float(rng.uniform(0.3, 1.2))
        r2_v = float(rng.uniform(100.0, 300.0))
        if fp is not None:
            chi_v = float(frng.uniform(*fp.calc_chi_ppm))
            r2_v = float(frng.uniform(*fp.calc_r2star_s))
        place(centre, diameter, lshape, chi_v, r2_v, s0_jit["calc"])
        taken.append((centre, bound(diameter, lshape)))
        lesions.append(describe("calcification", centre, diameter, chi_v, r2_v, lshape.to_json() if lshape else None))
    tm["lesions_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- acquisition
    t0 = time.perf_counter()
    chi[air] = acquire.CHI_AIR_PPM
    s0[air] = 0.0
    r2s[air] = 0.0
    ic_ext = ((sd <= t_csf) | ((vein_frac > 0) & (sd <= t_bone))) & ~air
    field_ext = acquire.compute_field_ppm(chi, ext, air_mask=air, pad_factor=pad_factor, local_mask=ic_ext)
    tm["field_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    field = np.ascontiguousarray(field_ext[fov])
    brain = np.ascontiguousarray(brain_ext[fov])
    bias = np.exp(acquire.smooth_random_field(geom, rng, order=2, amplitude=0.25)).astype(np.float32)
    phase0 = (acquire.smooth_random_field(geom, rng, order=2, amplitude=1.5) + rng.uniform(-np.pi, np.pi)).astype(np.float32)
    acq = Acquisition(echo_times_s=[float(t) for t in echo_times_s], field_strength_t=b0, snr=float(snr))
    mag, phase = acquire.gre_echoes(
        np.ascontiguousarray(s0[fov]), np.ascontiguousarray(r2s[fov]), field, acq.echo_times_s, b0,
        rng=rng, snr=snr, reference_mask=brain, receive_bias=bias, phase_offset_rad=phase0,
    )
    tm["signal_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- truth
    # intracranial space: brain, CSF layer and the dural sinuses / surface veins (which lie partly
    # in the inner table of the skull as modelled here)
    intracranial = np.ascontiguousarray(ic_ext[fov])
    chi_truth = np.where(intracranial, chi[fov], np.float32(0.0)).astype(np.float32)
    extra = {
        "field_ppm": field,
        "vein_mask": np.ascontiguousarray(vein_frac[fov] >= 0.5),
        "deep_gm_labels": np.ascontiguousarray(deep_ext[fov]),
        "deep_gm_codes": dict(anatomy.DEEP_GM_CODES),
        "mars_region": np.ascontiguousarray(mreg_ext[fov]),
        "intracranial_mask": intracranial,
        "transform_scale": xf.scale,
        "head_layers_mm": {"csf": float(t_csf), "bone": float(t_bone), "scalp": float(t_scalp)},
    }
    tm["total_s"] = time.perf_counter() - tick
    return SimulatedStudy(
        subject_id=subject_id,
        seed=int(seed),
        geometry=geom,
        acquisition=acq,
        magnitude=mag,
        phase_rad=phase,
        chi_ppm=chi_truth,
        brain_mask=brain,
        lesions=lesions,
        is_control=bool(control),
        extra_truth=extra,
        family=family,
        family_params=fp.to_json() if fp is not None else None,
    )
