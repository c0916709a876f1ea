"""training.realdata: label masks and lesion CSVs to truth.json records, signs checked explicitly."""

import json

import nibabel as nib
import numpy as np
import pytest

from core.errors import ConfigError
from core.geometry import Geometry
from training import evaluate as E
from training import realdata as R


def _mask(tmp_path):
    """Voxel->RAS affine with x flipped and 2 mm slices; a 3x3x3 cube and a single calcification voxel."""
    aff = np.array([[-1.0, 0, 0, 100.0], [0, 1.0, 0, -50.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])
    data = np.zeros((40, 30, 20), dtype=np.uint8)
    data[9:12, 19:22, 4:7] = 1  # centre voxel (10, 20, 5)
    data[30, 5, 15] = 2
    p = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    return p


def test_mask_two_blobs_centres_in_lps_and_diameters(tmp_path):
    les = R.lesions_from_mask(_mask(tmp_path))
    assert len(les) == 2 and all(l["kind"] == "cmb" for l in les)
    les = sorted(les, key=lambda l: l["n_voxels"], reverse=True)
    # RAS of voxel (10, 20, 5) = (-10 + 100, 20 - 50, 10 - 20) = (90, -30, -10): LPS = (-90, 30, -10)
    assert les[0]["centre_lps_mm"] == [-90.0, 30.0, -10.0]
    assert les[0]["centre_voxel"] == [10.0, 20.0, 5.0]
    assert les[0]["volume_mm3"] == 54.0
    assert les[0]["diameter_mm"] == pytest.approx((6 * 54 / np.pi) ** (1 / 3), abs=1e-3)
    # voxel (30, 5, 15): RAS (70, -45, 10) -> LPS (-70, 45, 10); 1 voxel of 2 mm3
    assert les[1]["centre_lps_mm"] == [-70.0, 45.0, 10.0]
    assert les[1]["diameter_mm"] == pytest.approx((12 / np.pi) ** (1 / 3), abs=1e-3)


def test_mask_calcification_label(tmp_path):
    les = R.lesions_from_mask(_mask(tmp_path), calcification_label=2)
    assert sorted(l["kind"] for l in les) == ["calcification", "cmb"]


def test_mask_centre_agrees_with_project_geometry(tmp_path):
    """A mask written with Geometry.nifti_affine() gives back Geometry.voxel_to_patient() (LPS)."""
    g = Geometry.from_parameters((20, 24, 16), (0.9, 1.1, 2.0), origin_lps=(12.0, -30.0, 40.0))
    data = np.zeros(g.shape, dtype=np.uint8)
    data[4:6, 7, 3] = 1  # centroid (4.5, 7, 3)
    p = tmp_path / "m.nii"
    nib.save(nib.Nifti1Image(data, g.nifti_affine()), str(p))
    (les,) = R.lesions_from_mask(p)
    assert les["centre_lps_mm"] == pytest.approx(list(g.voxel_to_patient([4.5, 7.0, 3.0])), abs=1e-3)


def test_csv_ras_converted_to_lps(tmp_path):
    p = tmp_path / "les.csv"
    p.write_text("x,y,z,diameter_mm,kind,mars_region\n10,-20,30,4.0,cmb,frontal\n-5,6,-7,6.5,calcification,\n")
    ras = R.lesions_from_csv(p, space="RAS")
    assert ras[0]["centre_lps_mm"] == [-10.0, 20.0, 30.0] and ras[0]["diameter_mm"] == 4.0
    assert ras[0]["mars_region"] == "frontal"
    assert ras[1]["centre_lps_mm"] == [5.0, -6.0, -7.0] and ras[1]["kind"] == "calcification"
    assert ras[1]["mars_region"] is None
    lps = R.lesions_from_csv(p, space="LPS")
    assert lps[0]["centre_lps_mm"] == [10.0, -20.0, 30.0]


def test_manifest_cli_then_evaluate(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.nii.gz").write_bytes(b"")  # only existence is checked here
    (tmp_path / "dicom_b").mkdir()
    mask = _mask(tmp_path)
    (tmp_path / "b.csv").write_text("x,y,z,diameter_mm\n10,-20,30,4.0\n")
    m = tmp_path / "cohort.csv"
    m.write_text(
        "subject_id,image,label,label_space,control,split\n"
        f"A,img/a.nii.gz,{mask.name},,no,test\n"
        "B,dicom_b,b.csv,RAS,0,test\n"
        "C,dicom_b,,,yes,train\n"
    )
    subs = R.load_manifest(m)
    assert [s.subject_id for s in subs] == ["A", "B", "C"]
    assert [s.image_kind for s in subs] == ["qsm_nifti", "gre_dicom_folder", "gre_dicom_folder"]
    assert [s.control for s in subs] == [False, False, True]
    out = tmp_path / "truth"
    assert R.main(["--manifest", str(m), "--out", str(out)]) == 0
    t = json.loads((out / "B" / "truth" / "truth.json").read_text())
    assert t["simulated"] is False and t["lesions"][0]["centre_lps_mm"] == [-10.0, 20.0, 30.0]
    assert json.loads((out / "A" / "truth" / "truth.json").read_text())["counts"]["cmb"] == 2
    # predictions: A finds the cube, B finds its lesion 2 mm off, C one FP
    pred = tmp_path / "pred"
    for sid, dets in {"A": [[-90, 30, -10]], "B": [[-10, 22, 30]], "C": [[0, 0, 0]]}.items():
        (pred / sid).mkdir(parents=True)
        (pred / sid / "findings.json").write_text(json.dumps({
            "study_instance_uid": "1", "algorithm_version": "t",
            "microbleeds": [{"index": 1, "kind": "cmb", "centre_lps_mm": c, "centre_voxel": [0, 0, 0],
                             "diameter_mm": 3, "volume_mm3": 14, "mean_chi_ppm": 0.3, "probability": 0.9}
                            for c in dets], "mimics": []}))
    r = E.evaluate(pred, out)
    c = r["stages"]["final"]["counts"]
    assert r["simulated"] is False and (c["tp"], c["fn"], c["fp"]) == (2, 1, 1)
    assert r["stages"]["final"]["controls"]["fraction_without_fp"] == 0.0


def test_manifest_errors(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("subject_id,image\nA,missing.nii.gz\n")
    with pytest.raises(ConfigError, match="does not exist"):
        R.load_manifest(m)
    (tmp_path / "x.nii").write_bytes(b"")
    m.write_text("subject_id,image,label\nA,x.nii,\n")
    with pytest.raises(ConfigError, match="only a control"):
        R.load_manifest(m)
    m.write_text("subject_id,image,control\nA,x.nii,maybe\n")
    with pytest.raises(ConfigError, match="control must be"):
        R.load_manifest(m)
    m.write_text("subject,image\nA,x.nii\n")
    with pytest.raises(ConfigError, match="lacks column"):
        R.load_manifest(m)
