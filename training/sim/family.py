"""Phantom families: the simulator's fixed choices ("default") and a domain-randomised one.

The detector in ``models/`` was trained and validated on the ``"default"`` family only: one tissue
susceptibility per tissue up to a +-20 % factor, spheres for every lesion, 3 T, SNR 40, echoes
6/12/18/24 ms (or one at 23 ms), 1 mm voxels. An independent phantom measured sensitivity 0.908
against our own 0.972 (issue 12): the model fits those choices. The ``"randomised"`` family draws
them per subject instead, from the subject's seed (:func:`draw_subject_params`), within
:class:`RandomisedRanges`:

* **acquisition**: field strength 1.5 / 3 / 7 T (probabilities 0.3 / 0.5 / 0.2), SNR 15-60
  (uniform), 2-6 echoes with the first at 2.5-8 ms, the last at most 40 ms and unequal spacing
  (each gap scaled by 0.6-1.4 before normalising, at least 2 ms), voxels 0.5-1.5 mm (in-plane
  i = j, slice k drawn separately, so anisotropic voxels occur); the matrix is capped at
  ``max_matrix_voxels`` (memory: the simulator holds about 20 float32 copies of the extended
  grid): first the slab (k) is shortened down to 140 mm, then the voxel is enlarged by a common
  factor. The capped values are the ones used and recorded (``voxel_capped``);
* **tissue susceptibility** (ppm, drawn independently per tissue, not one common scale), ranges
  spanning the healthy-adult means and their age dependence reported by Lim et al. 2013
  (NeuroImage 82:449, QSM atlas of 3 T values), Deistung et al. 2013 (NeuroImage 65:299, 7 T),
  Bilgic et al. 2012 (NeuroImage 59:2625, ageing) and Li et al. 2014 (Hum Brain Mapp 35:2698,
  lifespan): white matter -0.05 to -0.01, cortical grey 0.00 to 0.04, pallidum 0.10-0.26,
  substantia nigra 0.08-0.22, red nucleus 0.06-0.18, dentate 0.05-0.16, putamen 0.03-0.14,
  caudate 0.03-0.11, thalamus 0.00-0.06. CSF relative to water: -0.01 to +0.01 (not a measured
  value: the spread between QSM reference regions reported by Straub et al. 2017, MRM 78:204, so
  that the map's zero is not always exactly CSF's);
* **veins**: ``chi = Hct * dchi_do * (1 - Y)`` with ``dchi_do`` = 3.39 ppm (SI; 0.27 ppm cgs,
  Spees et al. 2001, MRM 45:533), haematocrit 0.36-0.46 per subject and venous oxygen saturation
  Y 0.55-0.72 per subject, +-0.05 per vein: 0.28-0.78 ppm (default family: 0.30-0.45);
* **lesions**: microbleed chi 0.1-2.5 ppm and R2* 150-1200 1/s at 3 T (default 0.2-1.5 ppm,
  250-800 1/s); calcification chi -0.1 to -2.0 ppm, R2* 50-400 1/s (default -0.3 to -1.2 ppm,
  100-300 1/s). These are deliberately wider than measured lesion values (domain randomisation),
  not a claim about real lesions. R2* scales linearly with B0 as in :mod:`training.sim.phantom`.
  Shapes (:class:`LesionShape`): sphere 0.25, ellipsoid 0.45 (axis ratios 0.5-1, random
  orientation), lobulated 0.30 (an ellipsoid with 2-4 spherical lobes of 0.35-0.6 of its radius
  centred at 0.6-0.9 of its surface). The drawn diameter (same law as the default family) is the
  *equivalent-sphere* diameter: every shape is scaled so its volume is that of the sphere, and
  placed with its centroid at the lesion centre. The partial-volume fraction is the inside share
  of 3 x 3 x 3 sub-samples per voxel.

Physics is the simulator's own for both families: lesion and tissue fields through the dipole
convolution of the whole head (:func:`training.sim.acquire.compute_field_ppm`), magnitude decay
``exp(-TE R2*)`` with intravoxel dephasing, phase ``2 pi gamma_bar B0 field TE``
(:func:`training.sim.acquire.gre_echoes`).

The family's draws come from their own generator, ``default_rng([seed, FAMILY_SALT, stream])``; the
subject's main generator makes exactly the calls it makes in the default family (anatomy, head
layers, vein paths, lesion positions and diameters), whose values the randomised ones then replace.
The default family draws nothing here and is bit-identical to the simulator before families
existed (``tests/unit/test_family.py`` pins it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from core.errors import ConfigError
from core.geometry import Geometry

FAMILIES: tuple[str, ...] = ("default", "randomised")
FAMILY_SALT = 0x52414E44  # "RAND"
DCHI_DEOXY_PPM = 3.39  # SI, fully deoxygenated vs oxygenated blood (Spees et al. 2001)
MIN_SLAB_MM = 140.0
SHAPE_KINDS: tuple[str, ...] = ("sphere", "ellipsoid", "lobulated")
SUBSAMPLES = 3


@dataclass(frozen=True)
class RandomisedRanges:
    """What the ``"randomised"`` family draws from (see the module docstring for the sources)."""

    field_strengths_t: tuple[float, ...] = (1.5, 3.0, 7.0)
    field_strength_p: tuple[float, ...] = (0.3, 0.5, 0.2)
    snr: tuple[float, float] = (15.0, 60.0)
    n_echoes: tuple[int, int] = (2, 6)
    first_te_s: tuple[float, float] = (0.0025, 0.008)
    max_te_s: float = 0.040
    min_echo_spacing_s: float = 0.002
    voxel_mm: tuple[float, float] = (0.5, 1.5)
    max_matrix_voxels: int = 16_000_000
    fov_mm: tuple[float, float, float] = (200.0, 232.0, 176.0)
    chi_wm: tuple[float, float] = (-0.05, -0.01)
    chi_gm: tuple[float, float] = (0.00, 0.04)
    chi_csf: tuple[float, float] = (-0.01, 0.01)
    chi_deep: dict = field(default_factory=lambda: {
        "pallidum": (0.10, 0.26), "substantia_nigra": (0.08, 0.22), "red_nucleus": (0.06, 0.18),
        "dentate": (0.05, 0.16), "putamen": (0.03, 0.14), "caudate": (0.03, 0.11),
        "thalamus": (0.00, 0.06)})
    haematocrit: tuple[float, float] = (0.36, 0.46)
    venous_saturation: tuple[float, float] = (0.55, 0.72)
    venous_saturation_per_vein: float = 0.05
    cmb_chi_ppm: tuple[float, float] = (0.1, 2.5)
    cmb_r2star_3t_s: tuple[float, float] = (150.0, 1200.0)
    calc_chi_ppm: tuple[float, float] = (-2.0, -0.1)
    calc_r2star_s: tuple[float, float] = (50.0, 400.0)
    shape_p: tuple[float, float, float] = (0.25, 0.45, 0.30)

    def __post_init__(self):
        lo, hi = self.voxel_mm
        if not 0 < lo <= hi:
            raise ConfigError(f"voxel range must be 0 < min <= max mm, got {self.voxel_mm}")
        if not 1 <= self.n_echoes[0] <= self.n_echoes[1]:
            raise ConfigError(f"echo count range must be 1 <= min <= max, got {self.n_echoes}")


@dataclass
class SubjectParams:
    """One subject's draws from :class:`RandomisedRanges` (recorded in truth.json)."""

    voxel_mm: tuple[float, float, float]
    voxel_drawn_mm: tuple[float, float, float]
    voxel_capped: bool
    shape: tuple[int, int, int]
    echo_times_s: list[float]
    field_strength_t: float
    snr: float
    chi_wm: float
    chi_gm: float
    chi_csf: float
    chi_deep: dict
    haematocrit: float
    venous_saturation: float
    cmb_chi_ppm: tuple[float, float]
    cmb_r2star_3t_s: tuple[float, float]
    calc_chi_ppm: tuple[float, float]
    calc_r2star_s: tuple[float, float]
    shape_p: tuple[float, float, float]

    def to_json(self) -> dict:
        d = asdict(self)
        out = {}
        for k, v in d.items():
            if isinstance(v, float):
                v = round(v, 6)
            elif isinstance(v, (list, tuple)):
                v = [round(float(x), 6) if isinstance(x, float) else x for x in v]
            elif isinstance(v, dict):
                v = {a: round(float(b), 6) for a, b in v.items()}
            out[k] = v
        return out


def family_rng(seed: int, stream: int = 0) -> np.random.Generator:
    """The randomised family's own generator for a subject seed: stream 0 for
    :func:`draw_subject_params`, stream 1 for the per-vein and per-lesion draws in the phantom."""
    return np.random.default_rng([int(seed), FAMILY_SALT, int(stream)])


def draw_echo_times(rng: np.random.Generator, r: RandomisedRanges) -> list[float]:
    """2-6 echo times: first 2.5-8 ms, last <= 40 ms, unequal gaps of >= 2 ms."""
    n = int(rng.integers(r.n_echoes[0], r.n_echoes[1] + 1))
    te1 = float(rng.uniform(*r.first_te_s))
    if n == 1:
        return [te1]
    lo = te1 + (n - 1) * r.min_echo_spacing_s
    last = float(rng.uniform(max(lo, min(te1 + 0.012, r.max_te_s)), r.max_te_s)) if lo < r.max_te_s else lo
    w = rng.uniform(0.6, 1.4, size=n - 1)
    span = last - te1 - (n - 1) * r.min_echo_spacing_s
    gaps = r.min_echo_spacing_s + span * w / w.sum()
    tes = te1 + np.concatenate([[0.0], np.cumsum(gaps)])
    return [round(float(t), 6) for t in tes]


def draw_voxel(rng: np.random.Generator, r: RandomisedRanges):
    """(voxel used, voxel drawn, capped, matrix) with the matrix memory cap applied."""
    inplane = float(rng.uniform(*r.voxel_mm))
    slice_mm = float(rng.uniform(*r.voxel_mm))
    drawn = (inplane, inplane, slice_mm)
    vox = np.array(drawn)
    fov = np.array(r.fov_mm, dtype=np.float64)
    shape = np.round(fov / vox).astype(int)
    capped = False
    if np.prod(shape) > r.max_matrix_voxels:
        capped = True
        nk = int(np.floor(r.max_matrix_voxels / (shape[0] * shape[1])))
        nk_min = int(np.ceil(MIN_SLAB_MM / vox[2]))
        if nk >= nk_min:
            shape[2] = nk
        else:
            shape[2] = nk_min
            fov = np.array([fov[0], fov[1], nk_min * vox[2]])
            factor = (np.prod(shape) / r.max_matrix_voxels) ** (1.0 / 3.0)
            vox = vox * factor
            shape = np.floor(fov / vox).astype(int)
    return tuple(round(float(v), 4) for v in vox), drawn, capped, tuple(int(n) for n in shape)


def draw_subject_params(seed: int, ranges: RandomisedRanges | None = None) -> SubjectParams:
    """The randomised family's acquisition, tissue and lesion-range draws for one subject seed."""
    r = ranges or RandomisedRanges()
    rng = family_rng(seed)
    p = np.asarray(r.field_strength_p, dtype=np.float64)
    b0 = float(r.field_strengths_t[int(rng.choice(len(r.field_strengths_t), p=p / p.sum()))])
    snr = float(rng.uniform(*r.snr))
    tes = draw_echo_times(rng, r)
    vox, drawn, capped, shape = draw_voxel(rng, r)
    return SubjectParams(
        voxel_mm=vox, voxel_drawn_mm=drawn, voxel_capped=capped, shape=shape, echo_times_s=tes,
        field_strength_t=b0, snr=snr,
        chi_wm=float(rng.uniform(*r.chi_wm)), chi_gm=float(rng.uniform(*r.chi_gm)),
        chi_csf=float(rng.uniform(*r.chi_csf)),
        chi_deep={k: float(rng.uniform(*v)) for k, v in r.chi_deep.items()},
        haematocrit=float(rng.uniform(*r.haematocrit)),
        venous_saturation=float(rng.uniform(*r.venous_saturation)),
        cmb_chi_ppm=tuple(r.cmb_chi_ppm), cmb_r2star_3t_s=tuple(r.cmb_r2star_3t_s),
        calc_chi_ppm=tuple(r.calc_chi_ppm), calc_r2star_s=tuple(r.calc_r2star_s),
        shape_p=tuple(r.shape_p),
    )


def vein_chi(rng: np.random.Generator, params: SubjectParams, spread: float) -> float:
    """One vein's susceptibility (ppm) from the subject's haematocrit and saturation."""
    y = float(np.clip(params.venous_saturation + rng.uniform(-spread, spread), 0.0, 1.0))
    return params.haematocrit * DCHI_DEOXY_PPM * (1.0 - y)


# --------------------------------------------------------------------------- lesion shapes


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, rr = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q @ np.diag(np.sign(np.diag(rr)))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


@dataclass(frozen=True)
class LesionShape:
    """A lesion's shape in its own frame, in mm around its centroid.

    ``inside(q)`` for points ``q`` (3, ...) relative to the centroid (LPS mm): union of the
    ellipsoid ``|R^T (q - o) / semi| <= 1`` and spheres ``|q - o - c_l| <= r_l``, with ``o`` the offset
    that puts the union's centroid at 0.
    """

    kind: str
    semi_axes_mm: tuple[float, float, float]
    rotation: tuple[tuple[float, ...], ...]
    lobe_centres_mm: tuple[tuple[float, float, float], ...] = ()
    lobe_radii_mm: tuple[float, ...] = ()
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def inside(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.float64)
        shp = (3,) + (1,) * (q.ndim - 1)
        q = q - np.asarray(self.offset_mm).reshape(shp)
        rot = np.asarray(self.rotation)
        local = np.tensordot(rot.T, q, axes=(1, 0))
        acc = np.zeros(q.shape[1:])
        for a in range(3):
            acc += (local[a] / self.semi_axes_mm[a]) ** 2
        ins = acc <= 1.0
        for c, rad in zip(self.lobe_centres_mm, self.lobe_radii_mm):
            d2 = np.zeros(q.shape[1:])
            for a in range(3):
                d2 += (q[a] - c[a]) ** 2
            ins |= d2 <= rad * rad
        return ins

    def bounding_radius_mm(self) -> float:
        """Radius of a sphere around the centroid containing the whole shape."""
        off = float(np.linalg.norm(self.offset_mm))
        r = max(self.semi_axes_mm) + off
        for c, rad in zip(self.lobe_centres_mm, self.lobe_radii_mm):
            r = max(r, float(np.linalg.norm(np.asarray(c) + np.asarray(self.offset_mm))) + rad)
        return float(r)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "semi_axes_mm": [round(float(v), 3) for v in self.semi_axes_mm],
            "rotation": [[round(float(v), 5) for v in row] for row in self.rotation],
            "lobe_centres_mm": [[round(float(v), 3) for v in c] for c in self.lobe_centres_mm],
            "lobe_radii_mm": [round(float(v), 3) for v in self.lobe_radii_mm],
            "offset_mm": [round(float(v), 3) for v in self.offset_mm],
            "bounding_radius_mm": round(self.bounding_radius_mm(), 3),
        }


def _volume_and_centroid(shape: LesionShape, extent_mm: float, n: int = 48) -> tuple[float, np.ndarray]:
    """Volume (mm^3) and centroid of ``shape`` on an n^3 lattice over [-extent, extent]^3."""
    ax = (np.arange(n) + 0.5) / n * 2 * extent_mm - extent_mm
    g = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))
    ins = shape.inside(g)
    cell = (2 * extent_mm / n) ** 3
    vol = float(ins.sum()) * cell
    cen = np.array([float(g[a][ins].mean()) for a in range(3)]) if ins.any() else np.zeros(3)
    return vol, cen


def draw_shape(rng: np.random.Generator, diameter_mm: float, shape_p=(0.25, 0.45, 0.30)) -> LesionShape:
    """A sphere, ellipsoid or lobulated shape with the volume of a sphere of ``diameter_mm``."""
    p = np.asarray(shape_p, dtype=np.float64)
    kind = SHAPE_KINDS[int(rng.choice(len(SHAPE_KINDS), p=p / p.sum()))]
    r = diameter_mm / 2.0
    if kind == "sphere":
        return LesionShape("sphere", (r, r, r), tuple(map(tuple, np.eye(3))))
    ratios = np.array([1.0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)])
    rot = _rotation(rng)
    unit = ratios / np.prod(ratios) ** (1.0 / 3.0)  # volume of the unit sphere
    if kind == "ellipsoid":
        semi = unit * r
        return LesionShape("ellipsoid", tuple(float(v) for v in semi), tuple(map(tuple, rot)))
    n_lobes = int(rng.integers(2, 5))
    centres, radii = [], []
    for _ in range(n_lobes):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        # point on the ellipsoid surface along d (in the rotated frame), then a share of it
        dl = rot.T @ d
        t = 1.0 / np.sqrt(np.sum((dl / unit) ** 2))
        centres.append(d * t * rng.uniform(0.6, 0.9))
        radii.append(float(rng.uniform(0.35, 0.6)))
    base = LesionShape("lobulated", tuple(float(v) for v in unit), tuple(map(tuple, rot)),
                       tuple(tuple(float(x) for x in c) for c in centres), tuple(radii))
    vol, cen = _volume_and_centroid(base, 2.5)
    s = r / (vol / (4.0 / 3.0 * np.pi)) ** (1.0 / 3.0)  # scale so the volume is the sphere's
    return LesionShape("lobulated", tuple(float(v * s) for v in unit), tuple(map(tuple, rot)),
                       tuple(tuple(float(x * s) for x in c) for c in centres),
                       tuple(float(x * s) for x in radii), tuple(float(-v * s) for v in cen))


def voxel_box(geometry: Geometry, centre_lps: np.ndarray, radius_mm: float):
    """(slices, voxel indices float64 (3, a, b, c)) of the grid box within ``radius_mm`` (plus one
    voxel) of a point, clipped to the grid; None when the box is empty."""
    v = geometry.patient_to_voxel(centre_lps)
    r = np.ceil(radius_mm / np.asarray(geometry.spacing)) + 1
    lo = np.maximum(np.floor(v - r).astype(int), 0)
    hi = np.minimum(np.ceil(v + r).astype(int) + 1, geometry.shape)
    if np.any(hi <= lo):
        return None
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")).astype(np.float64)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), idx


def shape_fraction(geometry: Geometry, centre_lps: np.ndarray, shape: LesionShape):
    """(box slices, partial-volume fraction float32) of ``shape`` at ``centre_lps``, or None.

    The fraction is the share of ``SUBSAMPLES**3`` regularly spaced points per voxel inside.
    """
    box = voxel_box(geometry, centre_lps, shape.bounding_radius_mm() + max(geometry.spacing))
    if box is None:
        return None
    sl, idx = box
    frac = np.zeros(idx.shape[1:], dtype=np.float64)
    sub = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES - 0.5
    m = geometry.affine[:3, :3]
    base = np.tensordot(m, idx, axes=(1, 0)) + (geometry.affine[:3, 3] - np.asarray(centre_lps)).reshape(3, 1, 1, 1)
    for a in sub:
        for b in sub:
            for c in sub:
                off = m @ np.array([a, b, c])
                frac += shape.inside(base + off.reshape(3, 1, 1, 1))
    frac /= SUBSAMPLES ** 3
    return sl, frac.astype(np.float32)
