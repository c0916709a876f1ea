"""MARS localisation: frames of the registration result, a known affine recovered, the count table."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core import mars
from core.findings import Finding, StudyFindings
from core.geometry import Geometry
from core.localize import localize, mars_table
from core.registration import TemplateRegistration, load_template, register_template

FLIP = np.diag([-1.0, -1.0, 1.0])
CENTRE_RAS = np.array([0.0, -18.0, 18.0])


def _rot(deg_x: float, deg_y: float, deg_z: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([deg_x, deg_y, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class KnownAffine:
    """Subject LPS -> MNI RAS: ras = c + A (flip(lps) - c) + t."""

    def __init__(self, a: np.ndarray, t: np.ndarray) -> None:
        self.a, self.t = a, t

    def subject_to_mni(self, lps: np.ndarray) -> np.ndarray:
        q = np.atleast_2d(lps) @ FLIP.T
        out = (q - CENTRE_RAS) @ self.a.T + CENTRE_RAS + self.t
        return out[0] if np.ndim(lps) == 1 else out

    def mni_to_subject(self, ras: np.ndarray) -> np.ndarray:
        q = (np.atleast_2d(ras) - CENTRE_RAS - self.t) @ np.linalg.inv(self.a).T + CENTRE_RAS
        return q @ FLIP.T

    def sitk_transform(self):
        """The same map as an ITK transform (subject LPS -> template LPS)."""
        import SimpleITK as sitk

        # template LPS = F ras = F c + F A (F lps - c) + F t
        m = FLIP @ self.a @ FLIP
        off = FLIP @ (CENTRE_RAS + self.t) - FLIP @ self.a @ CENTRE_RAS
        tr = sitk.AffineTransform(3)
        tr.SetMatrix(tuple(m.ravel()))
        tr.SetTranslation(tuple(off))
        return tr


KNOWN = KnownAffine(_rot(6.0, -4.0, 5.0) @ np.diag([1.06, 0.95, 1.03]), np.array([4.0, -6.0, 3.0]))


def _deep_points(n_per_region: int = 2) -> list[tuple[str, np.ndarray]]:
    """MNI points well inside each MARS region (eroded label), chosen deterministically."""
    atlas = mars.build_mars_atlas()
    out = []
    for r in mars.MARS_REGIONS:
        depth = ndimage.distance_transform_edt(atlas.region == r.index)
        idx = np.argwhere(depth >= min(3.0, depth.max()))  # >= 3 voxels (4.5 mm) inside, or the deepest
        assert len(idx), r.key
        pick = idx[np.linspace(0, len(idx) - 1, n_per_region).astype(int)]
        out += [(r.key, atlas.voxel_to_ras(v)) for v in pick]
    return out


def _subject_geometry() -> Geometry:
    centre_lps = KNOWN.mni_to_subject(CENTRE_RAS)[0]
    return Geometry.oblique((80, 96, 80), (2.0, 2.0, 2.0), 12.0, centre_lps)


def test_known_affine_localises_points_in_every_region() -> None:
    pts = _deep_points()
    lps = KNOWN.mni_to_subject(np.array([p for _, p in pts]))
    findings = [Finding(index=i + 1, kind="cmb", centre_lps_mm=tuple(q), centre_voxel=(0, 0, 0),
                        diameter_mm=3.0, volume_mm3=14.0, mean_chi_ppm=0.5, probability=0.9)
                for i, q in enumerate(lps)]
    reg = TemplateRegistration(transform=KNOWN.sitk_transform(), geometry=_subject_geometry(), metric=0.0)
    # the ITK transform and the numpy map agree (LPS/RAS frames handled)
    np.testing.assert_allclose(reg.subject_to_mni(lps), KNOWN.subject_to_mni(lps), atol=1e-6)
    out = localize(StudyFindings("1.2.3", "test", findings), reg)
    assert [f.mars_region for f in out.findings] == [k for k, _ in pts]
    for f, (_, ras) in zip(out.findings, pts):
        assert f.mars_category == mars.category_of(f.mars_region)
        assert f.side == mars.region_at(ras)[1]
        if abs(ras[0]) > 5:
            assert f.side == ("right" if ras[0] > 0 else "left")


def test_mars_resampled_onto_subject_matches_point_lookup() -> None:
    geom = _subject_geometry()
    reg = TemplateRegistration(transform=KNOWN.sitk_transform(), geometry=geom, metric=0.0)
    region, side = reg.mars_on_subject()
    assert region.shape == geom.shape
    pts = _deep_points(3)
    lps = KNOWN.mni_to_subject(np.array([p for _, p in pts]))
    hits = 0
    for (key, _), q in zip(pts, lps):
        v = tuple(int(round(c)) for c in geom.patient_to_voxel(q))
        hits += mars.REGION_BY_INDEX.get(int(region[v]), None) is not None and \
            mars.REGION_BY_INDEX[int(region[v])].key == key
    assert hits >= len(pts) - 2  # 2 mm voxel rounding may move a point across a thin label edge
    assert set(np.unique(side)) <= {0, 1, 2, 3}


@pytest.fixture(scope="module")
def warped_template():
    """The MNI T1 template resampled onto an oblique 2 mm subject grid through KNOWN."""
    tpl, aff = load_template()
    geom = _subject_geometry()
    ijk = np.indices(geom.shape).reshape(3, -1).T.astype(np.float64)
    ras = KNOWN.subject_to_mni(ijk @ geom.affine[:3, :3].T + geom.affine[:3, 3])
    vox = (ras - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T
    img = ndimage.map_coordinates(tpl, vox.T, order=1, cval=0.0).reshape(geom.shape).astype(np.float32)
    return img, geom


def test_registration_recovers_known_affine(warped_template) -> None:
    img, geom = warped_template
    mask = img > 0.05 * img.max()
    reg = register_template(img, mask, geom, working_mm=3.0)
    assert set(reg.timings_s) >= {"affine_s", "total_s"}
    ijk = np.argwhere(ndimage.binary_erosion(mask, iterations=3))[::97].astype(np.float64)
    lps = ijk @ geom.affine[:3, :3].T + geom.affine[:3, 3]
    err = np.linalg.norm(reg.subject_to_mni(lps) - KNOWN.subject_to_mni(lps), axis=1)
    # the known map shifts points by 4-20 mm; recovered to ~0.1 mm on this noise-free case
    assert np.median(err) < 0.5, np.median(err)
    assert err.max() < 2.0, err.max()


def _f(i: int, region: str | None, side: str | None, p: float, kind: str = "cmb") -> Finding:
    return Finding(index=i, kind=kind, centre_lps_mm=(0, 0, 0), centre_voxel=(0, 0, 0), diameter_mm=3.0,
                   volume_mm3=14.0, mean_chi_ppm=0.5, probability=p, mars_region=region,
                   mars_category=mars.category_of(region) if region else None, side=side)


def test_mars_table_counts() -> None:
    items = [
        _f(1, "frontal", "left", 0.95), _f(2, "frontal", "left", 0.5), _f(3, "frontal", "right", 0.85),
        _f(4, "thalamus", "right", 0.81), _f(5, "cerebellum", "left", 0.3), _f(6, "brainstem", "midline", 0.9),
        _f(7, None, None, 0.9), _f(8, "temporal", "left", 0.99, kind="calcification"),
    ]
    t = mars_table(StudyFindings("1.2.3", "test", items))
    assert t["regions"]["frontal"]["left"] == {"definite": 1, "possible": 1}
    assert t["regions"]["frontal"]["right"] == {"definite": 1, "possible": 0}
    assert t["regions"]["frontal"]["total"] == 3
    assert t["regions"]["temporal"]["total"] == 0  # calcifications are not counted
    assert t["regions"]["brainstem"]["midline"]["definite"] == 1
    assert t["categories"]["lobar"] == {"definite": 2, "possible": 1, "total": 3}
    assert t["categories"]["deep"] == {"definite": 1, "possible": 0, "total": 1}
    assert t["categories"]["infratentorial"] == {"definite": 1, "possible": 1, "total": 2}
    assert t["unlocalised"] == 1
    assert t["total"] == {"definite": 5, "possible": 2, "total": 7}
    assert len(t["regions"]) == 13


def test_deformable_stage_keeps_the_known_affine(warped_template) -> None:
    """The optional BSpline stage, composed after the affine, must not spoil an exact affine fit."""
    img, geom = warped_template
    mask = img > 0.05 * img.max()
    reg = register_template(img, mask, geom, working_mm=4.0, deformable=True, bspline_iterations=10)
    assert reg.deformable and "bspline_s" in reg.timings_s
    ijk = np.argwhere(ndimage.binary_erosion(mask, iterations=3))[::97].astype(np.float64)
    lps = ijk @ geom.affine[:3, :3].T + geom.affine[:3, 3]
    err = np.linalg.norm(reg.subject_to_mni(lps) - KNOWN.subject_to_mni(lps), axis=1)
    assert np.median(err) < 1.0, np.median(err)
    assert np.percentile(err, 95) < 2.0, np.percentile(err, 95)
