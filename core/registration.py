"""Register the MNI152 T1 template to a subject's GRE magnitude (for MARS localisation).

The seed paper localises microbleeds by registering an atlas to the subject. Here the moving image
is the skull-stripped MNI152 2009a T1 template shipped with nilearn, the fixed image is the
subject's first-echo GRE magnitude multiplied by the brain mask of our QSM chain
(:func:`core.qsm.mask.brain_mask`). Both images are therefore "brain on black", and their shapes
and internal contrast drive the fit.

Method (SimpleITK / ITK v4 registration framework):

1. centre-of-mass initialisation (``CenteredTransformInitializer``, MOMENTS) of a 3-D affine;
2. multi-resolution affine registration: Mattes mutual information (Mattes et al., IEEE TMI 2003;
   MI because GRE magnitude and T1 contrast differ), regular gradient descent with physical-shift
   scaling, shrink factors 4/2/1 (coarse grid only for speed), metric sampled inside the subject's
   brain mask dilated by a few mm (so the brain edge takes part);
3. optional cubic BSpline (free-form deformation, Rueckert et al., IEEE TMI 1999) on a coarse
   control grid (50 mm), Mattes MI, L-BFGS-B, composed after the affine. Off by default: on the
   10 simulated 1 mm subjects of bench/mars.py it lowers the mean microbleed centre error from
   2.19 to 1.74 mm (voxelwise MARS agreement 0.929 -> 0.944) but gives the same region agreement
   (137/150 both; one subject got worse, 11/15 vs 13/15) at ~22 s per subject instead of ~5 s
   (bench/results/mars_deformable.json). Finer or multi-level BSplines (25 mm mesh, 3 levels:
   ~330 s per subject, 42/45 on three subjects), sequential 50 + 25 mm BSpline stages and an MI
   displacement-field fit (4 -> 2 mm) raised the MI but did not lower the true error on the same
   simulated subjects, so none of them is used.

Measured (bench/mars.py, 10 simulated 1 mm subjects, affine): see bench/results/mars.json.

Frames: ITK physical space is LPS. The subject image gets origin/direction/spacing from
``Geometry`` (already LPS). The template NIfTI affine is RAS, so its first two rows are negated to
build the LPS image. The fitted transform maps *fixed* (subject LPS) points to *moving* (template
LPS) points; MNI RAS is that with x and y negated.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from core.errors import ReconstructionError
from core.geometry import Geometry

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def _sitk():
    import SimpleITK as sitk

    return sitk


def image_from_array(volume: np.ndarray, affine_lps: np.ndarray, dtype=np.float32):
    """SimpleITK image of an ``[i, j, k]`` array whose voxel -> LPS mm affine is ``affine_lps``.

    SimpleITK arrays are ``[k, j, i]``; the affine's columns are direction times spacing.
    """
    sitk = _sitk()
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(np.asarray(volume, dtype=dtype), (2, 1, 0))))
    a = np.asarray(affine_lps, dtype=np.float64)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    direction = a[:3, :3] / spacing
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    img.SetOrigin(tuple(float(v) for v in a[:3, 3]))
    return img


def array_from_image(img) -> np.ndarray:
    """``[i, j, k]`` numpy array of a SimpleITK image."""
    sitk = _sitk()
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def ras_to_lps_affine(affine_ras: np.ndarray) -> np.ndarray:
    return RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)


def load_template() -> tuple[np.ndarray, np.ndarray]:
    """The skull-stripped MNI152 T1 template (float32 ``[i, j, k]``) and its voxel -> RAS affine."""
    import nibabel as nib

    from core.package_data import nilearn_data_dir

    img = nib.load(os.path.join(nilearn_data_dir(), TEMPLATE_FILE))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


@dataclass
class TemplateRegistration:
    """Result of :func:`register_template`.

    Attributes:
        transform: SimpleITK transform mapping subject LPS points to template LPS points.
        geometry: the subject grid it was fitted on.
        metric: final Mattes MI value (more negative = better match).
        timings_s: seconds per stage.
    """

    transform: object = field(repr=False)
    geometry: Geometry
    metric: float
    timings_s: dict[str, float] = field(default_factory=dict)
    deformable: bool = False

    def subject_to_mni(self, points_lps: np.ndarray) -> np.ndarray:
        """Subject LPS mm points ``(n, 3)`` (or one ``(3,)``) -> MNI RAS mm, same shape."""
        p = np.asarray(points_lps, dtype=np.float64)
        one = p.ndim == 1
        p = np.atleast_2d(p)
        out = np.array([self.transform.TransformPoint(tuple(float(v) for v in q)) for q in p])
        out[:, :2] *= -1.0
        return out[0] if one else out

    def resample_to_subject(self, volume: np.ndarray, affine_ras: np.ndarray, *, nearest: bool = True,
                            default: float = 0.0) -> np.ndarray:
        """Resample an MNI-space volume (voxel -> RAS ``affine_ras``) onto the subject grid.

        ``nearest`` for label volumes (MARS region / side), else linear.
        """
        sitk = _sitk()
        vol = np.asarray(volume)
        dtype = np.float32 if not nearest else (np.int32 if vol.dtype.kind in "iub" else np.float32)
        moving = image_from_array(vol, ras_to_lps_affine(affine_ras), dtype=dtype)
        ref = image_from_array(np.zeros(self.geometry.shape, np.uint8), self.geometry.affine, dtype=np.uint8)
        interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        out = sitk.Resample(moving, ref, self.transform, interp, float(default), moving.GetPixelID())
        return array_from_image(out).astype(vol.dtype if nearest else np.float32)

    def mars_on_subject(self, *, fill_mm: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
        """MARS region and side volumes (uint8) on the subject grid (nearest neighbour)."""
        from core.mars import build_mars_atlas

        atlas = build_mars_atlas()
        region, side = atlas.filled(max_mm=fill_mm)
        return (self.resample_to_subject(region, atlas.affine).astype(np.uint8),
                self.resample_to_subject(side, atlas.affine).astype(np.uint8))


def _downsample_to(img, spacing_mm: float):
    """Resample ``img`` to isotropic ``spacing_mm`` (Gaussian-smoothed first) on the same axes."""
    sitk = _sitk()
    sp = np.asarray(img.GetSpacing())
    if np.all(sp >= spacing_mm - 1e-6):
        return img
    sigma = [max((spacing_mm**2 - s**2), 0.0) ** 0.5 / 2.355 for s in sp]
    sm = sitk.SmoothingRecursiveGaussian(img, sigma)
    size = [int(np.ceil(n * s / spacing_mm)) for n, s in zip(img.GetSize(), sp)]
    return sitk.Resample(sm, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                         (spacing_mm,) * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)


def register_template(
    gre_magnitude_first_echo: np.ndarray,
    brain_mask: np.ndarray,
    geometry: Geometry,
    *,
    deformable: bool = False,
    working_mm: float = 2.0,
    iterations: int = 200,
    bspline_mesh_mm: float = 50.0,
    bspline_iterations: int = 25,
    seed: int = 1,
) -> TemplateRegistration:
    """Register the MNI T1 template to the subject; return subject LPS -> template transform.

    Args:
        gre_magnitude_first_echo: ``[i, j, k]`` (or ``[e, i, j, k]``; echo 0 is used).
        brain_mask: ``[i, j, k]`` boolean brain mask of the subject (not truth: our QSM mask).
        geometry: subject grid (LPS).
        deformable: add a BSpline stage after the affine.
        working_mm: both images are resampled to this isotropic spacing before fitting.
        iterations: gradient-descent iterations per level.
        bspline_mesh_mm: control-point spacing of the BSpline stage.
        bspline_iterations: L-BFGS-B iterations per level of the BSpline stage.
        seed: metric sampling seed (fixed -> reproducible). Must be positive: SimpleITK reads 0 as
            ``sitkWallClock`` (a new seed every run), which made registrations differ run to run.

    Raises:
        ReconstructionError: empty mask or mismatched shapes.
    """
    sitk = _sitk()
    if seed <= 0:
        raise ValueError("seed must be positive (SimpleITK treats 0 as a wall-clock seed)")
    tm: dict[str, float] = {}
    t0 = time.perf_counter()
    mag = np.asarray(gre_magnitude_first_echo, dtype=np.float32)
    if mag.ndim == 4:
        mag = mag[0]
    mask = np.asarray(brain_mask, dtype=bool)
    if mag.shape != tuple(geometry.shape) or mask.shape != mag.shape:
        raise ReconstructionError(
            f"magnitude {mag.shape}, brain mask {mask.shape} and grid {tuple(geometry.shape)} differ; "
            "cannot register the atlas")
    if mask.sum() < 1000:
        raise ReconstructionError("brain mask is (nearly) empty; cannot register the MARS atlas")
    ref = float(np.percentile(mag[mask], 99.0)) or 1.0
    fixed_full = image_from_array(np.where(mask, mag / ref, 0.0), geometry.affine)
    fixed = _downsample_to(fixed_full, working_mm)

    tpl, tpl_aff = load_template()
    tpl = tpl / (float(np.percentile(tpl[tpl > 0], 99.0)) or 1.0)
    moving = _downsample_to(image_from_array(tpl, ras_to_lps_affine(tpl_aff)), working_mm)
    # metric region: subject brain dilated by ~6 mm so the brain edge contributes
    fmask = sitk.BinaryThreshold(fixed, 1e-3, 1e9, 1, 0)
    rad = max(1, int(round(6.0 / working_mm)))
    fmask = sitk.BinaryDilate(fmask, (rad,) * 3)
    tm["prepare_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed)
    reg.SetMetricFixedMask(fmask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=iterations, relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    affine = reg.Execute(fixed, moving)
    metric = float(reg.GetMetricValue())
    tm["affine_s"] = time.perf_counter() - t1

    transform = affine
    if deformable:
        t2 = time.perf_counter()
        size_mm = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
        mesh = [max(1, int(round(s / bspline_mesh_mm))) for s in size_mm]
        bs = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
        reg2 = sitk.ImageRegistrationMethod()
        reg2.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg2.SetMetricSamplingStrategy(reg2.RANDOM)
        reg2.SetMetricSamplingPercentage(0.1, seed)
        reg2.SetMetricFixedMask(fmask)
        reg2.SetInterpolator(sitk.sitkLinear)
        reg2.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=bspline_iterations,
                                  maximumNumberOfCorrections=5,
                                  maximumNumberOfFunctionEvaluations=2 * bspline_iterations)
        reg2.SetShrinkFactorsPerLevel([2, 1])
        reg2.SetSmoothingSigmasPerLevel([1.0, 0.0])
        reg2.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg2.SetMovingInitialTransform(affine)
        reg2.SetInitialTransform(bs, inPlace=True)
        reg2.Execute(fixed, moving)
        metric = float(reg2.GetMetricValue())
        composite = sitk.CompositeTransform(3)
        # composite applies the last-added transform first: subject -> (bspline) -> (affine) -> template
        composite.AddTransform(affine)
        composite.AddTransform(bs)
        transform = composite
        tm["bspline_s"] = time.perf_counter() - t2
    tm["total_s"] = time.perf_counter() - t0
    return TemplateRegistration(transform=transform, geometry=geometry, metric=metric, timings_s=tm,
                                deformable=deformable)
