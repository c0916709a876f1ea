"""MARS regions and the MARS label volume built from the Neuromorphometrics atlas."""

from __future__ import annotations

import numpy as np
import pytest

from core import mars


@pytest.fixture(scope="module")
def atlas() -> mars.MarsAtlas:
    return mars.build_mars_atlas()


def test_thirteen_regions_in_three_categories():
    assert len(mars.MARS_REGIONS) == 13
    assert len({r.key for r in mars.MARS_REGIONS}) == 13
    assert [r.index for r in mars.MARS_REGIONS] == list(range(1, 14))
    cats = [r.category for r in mars.MARS_REGIONS]
    assert cats.count("lobar") == 5 and cats.count("deep") == 6 and cats.count("infratentorial") == 2
    assert mars.category_of("internal_capsule") == "deep"
    with pytest.raises(KeyError):
        mars.region("hippocampus")


def test_every_region_has_voxels(atlas):
    vol_ml = atlas.spacing_mm**3 / 1000.0
    for r in mars.MARS_REGIONS:
        n = int((atlas.region == r.index).sum())
        assert n * vol_ml > 2.0, r.key  # every region at least 2 ml
    # the lobes dominate, as in a real brain
    frontal = (atlas.region == mars.REGION_BY_KEY["frontal"].index).sum()
    insula = (atlas.region == mars.REGION_BY_KEY["insula"].index).sum()
    assert frontal > 5 * insula


def test_all_tissue_labels_covered(atlas):
    names = mars.read_neuromorphometrics_labels()
    no_region = {i for i, n in names.items()
                 if any(s in n for s in ("Ventricle", "Vent", "CSF", "vessel", "Optic_Chiasm"))}
    unassigned = set(np.unique(atlas.labels[(atlas.region == 0) & (atlas.labels > 0)]).tolist())
    assert unassigned <= no_region
    tissue = (atlas.labels > 0) & ~np.isin(atlas.labels, list(no_region))
    assert np.all(atlas.region[tissue] > 0)
    assert np.all(atlas.side[atlas.region > 0] > 0)


def test_unknown_label_is_refused():
    with pytest.raises(ValueError, match="no MARS assignment"):
        mars.label_table({999: "Left_Mystery_Gyrus"})


@pytest.mark.parametrize(
    "ras, key, side",
    [
        ((20.0, 5.0, 0.0), "basal_ganglia", "right"),  # right putamen
        ((-25.0, 0.0, 5.0), "basal_ganglia", "left"),
        ((12.0, -18.0, 8.0), "thalamus", "right"),
        ((0.0, -25.0, -30.0), "brainstem", "midline"),  # pons
        ((-20.0, -60.0, -35.0), "cerebellum", "left"),
        ((38.0, 0.0, 5.0), "insula", "right"),
        ((-45.0, 20.0, 20.0), "frontal", "left"),
        ((-40.0, -20.0, -20.0), "temporal", "left"),
        ((20.0, -95.0, 0.0), "occipital", "right"),
        ((-40.0, -60.0, 45.0), "parietal", "left"),
        ((0.0, 0.0, 20.0), "corpus_callosum", "midline"),
    ],
)
def test_region_at_known_points(ras, key, side):
    assert mars.region_at(ras) == (key, side)


def test_white_matter_split_geometry(atlas):
    idx = {k: mars.REGION_BY_KEY[k].index for k in ("corpus_callosum", "internal_capsule", "external_capsule",
                                                   "deep_periventricular_wm")}
    ras = {k: atlas.voxel_to_ras(np.argwhere(atlas.region == v)) for k, v in idx.items()}
    assert np.abs(ras["corpus_callosum"][:, 0]).max() <= 8.0
    # internal capsule lies medial to the external capsule in each hemisphere
    ic_x = np.median(np.abs(ras["internal_capsule"][:, 0]))
    ec_x = np.median(np.abs(ras["external_capsule"][:, 0]))
    assert 12.0 < ic_x < ec_x < 40.0
    # deep white matter is away from the midline and mostly above the basal ganglia
    assert np.median(ras["deep_periventricular_wm"][:, 2]) > 10.0


def test_side_from_x():
    assert mars.side_from_x_ras(10.0) == "right"
    assert mars.side_from_x_ras(-10.0) == "left"
    assert mars.side_from_x_ras(1.0) == "midline"
