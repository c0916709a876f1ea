"""Ground truth of one simulated subject on disk: NIfTI maps and ``truth.json``.

Files written into ``out_dir``:

* ``chi.nii.gz``: susceptibility (ppm relative to CSF) inside the intracranial space, 0 outside;
* ``brain_mask.nii.gz``: uint8 brain mask;
* ``truth.json``: subject id, seed, control flag, geometry (``Geometry.describe()``), acquisition,
  lesion list (``Lesion.to_json()``) and counts per kind, MARS category and region, the phantom
  ``family`` (:mod:`training.sim.family`) and, for the randomised family, its per-subject draws
  (``family_params``: voxel, echo times, B0, SNR, tissue and vein susceptibilities, lesion ranges).
  In the randomised family the susceptibility is relative to water with CSF at ``chi_csf``
  (within +-0.01 ppm); in the default family CSF is water (0).

NIfTI affines are ``geometry.nifti_affine()`` (RAS), arrays in ``[i, j, k]`` order, so the maps
overlay the DICOM series written from the same study in any viewer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

import numpy as np

from training.sim.study import SimulatedStudy

TRUTH_VERSION = 1


def lesion_counts(lesions: list) -> dict:
    """Counts per kind, and for microbleeds per MARS category, region and size class."""
    cmbs = [l for l in lesions if l.kind == "cmb"]
    return {
        "cmb": len(cmbs),
        "calcification": sum(1 for l in lesions if l.kind == "calcification"),
        "cmb_by_category": dict(Counter(l.mars_category for l in cmbs)),
        "cmb_by_region": dict(Counter(l.mars_region for l in cmbs)),
        "cmb_by_size": {
            "2-5mm": sum(1 for l in cmbs if l.diameter_mm < 5.0),
            "5-10mm": sum(1 for l in cmbs if l.diameter_mm >= 5.0),
        },
    }


def truth_dict(study: SimulatedStudy) -> dict:
    """The JSON-ready truth record of a study."""
    return {
        "truth_version": TRUTH_VERSION,
        "simulated": True,
        "subject_id": study.subject_id,
        "seed": int(study.seed),
        "control": bool(study.is_control),
        "geometry": study.geometry.describe(),
        "acquisition": dataclasses.asdict(study.acquisition),
        "lesions": [l.to_json() for l in study.lesions],
        "counts": lesion_counts(study.lesions),
        "family": study.family,
        **({"family_params": study.family_params} if study.family_params is not None else {}),
    }


def write_truth(study: SimulatedStudy, out_dir: str) -> None:
    """Write ``chi.nii.gz``, ``brain_mask.nii.gz`` and ``truth.json`` for one study."""
    import nibabel as nib

    os.makedirs(out_dir, exist_ok=True)
    aff = study.geometry.nifti_affine()
    chi = nib.Nifti1Image(np.asarray(study.chi_ppm, dtype=np.float32), aff)
    chi.header.set_xyzt_units("mm")
    chi.header["descrip"] = b"susceptibility ppm rel. CSF (simulated)"
    nib.save(chi, os.path.join(out_dir, "chi.nii.gz"))
    mask = nib.Nifti1Image(np.asarray(study.brain_mask, dtype=np.uint8), aff)
    mask.header.set_xyzt_units("mm")
    nib.save(mask, os.path.join(out_dir, "brain_mask.nii.gz"))
    with open(os.path.join(out_dir, "truth.json"), "w") as fh:
        json.dump(truth_dict(study), fh, indent=1)
