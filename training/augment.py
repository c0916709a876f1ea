"""Patch augmentation for stage II training (V-Net / ResNet on 32^3 QSM patches).

MONAI dictionary transforms applied to a QSM patch and its lesion mask *together*, so spatial
transforms move both the same way; intensity transforms touch the patch only:

* ``RandFlipd`` on each of the three axes (p = 0.5 each);
* ``RandRotate90d`` in the (i, j) plane only (p = 0.5, k = 1-3 quarter turns);
* ``RandScaleIntensityd`` (patch only, factors +-0.2: ``chi * (1 + f)``), which mimics the
  contrast spread of microbleeds;
* ``RandGaussianNoised`` (patch only, p = 0.5, std 0.02 ppm, the order of QSM noise).

Why these and not arbitrary rotations: the dipole pattern around a susceptibility source is
symmetric under a flip of any axis and under rotations about B0, which lies along k for the axial
(non-oblique) acquisitions we simulate; rotating out of the (i, j) plane would create dipole
patterns that the scanner cannot produce (and would mix the slice direction of anisotropic voxels).

Deterministic: :class:`PatchAugmenter` owns its random state (``seed``), so a run with the same
seed and the same call order gives the same patches.
"""

from __future__ import annotations

import numpy as np


class PatchAugmenter:
    """Random flips / in-plane quarter turns / intensity scale / noise for (patch, mask) pairs.

    ``__call__(patch [D, H, W], mask [D, H, W]) -> (patch, mask)`` as float32 / uint8 numpy arrays.
    """

    def __init__(self, seed: int = 0, flip_prob: float = 0.5, rot90_prob: float = 0.5,
                 scale_factor: float = 0.2, noise_prob: float = 0.5, noise_std_ppm: float = 0.02) -> None:
        from monai.transforms import (Compose, RandFlipd, RandGaussianNoised, RandRotate90d,
                                      RandScaleIntensityd)

        keys = ["image", "mask"]
        self.transform = Compose([
            RandFlipd(keys, prob=flip_prob, spatial_axis=0),
            RandFlipd(keys, prob=flip_prob, spatial_axis=1),
            RandFlipd(keys, prob=flip_prob, spatial_axis=2),
            RandRotate90d(keys, prob=rot90_prob, max_k=3, spatial_axes=(0, 1)),
            RandScaleIntensityd("image", factors=scale_factor, prob=1.0 if scale_factor > 0 else 0.0),
            RandGaussianNoised("image", prob=noise_prob, mean=0.0, std=noise_std_ppm),
        ], lazy=False)
        self.transform.set_random_state(seed=int(seed))

    def __call__(self, patch: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = {"image": np.asarray(patch, np.float32)[None], "mask": np.asarray(mask, np.float32)[None]}
        out = self.transform(d)
        img = np.asarray(out["image"], dtype=np.float32)[0]
        msk = (np.asarray(out["mask"], dtype=np.float32)[0] > 0.5).astype(np.uint8)
        return np.ascontiguousarray(img), np.ascontiguousarray(msk)

    def batch(self, patches: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Augment each pair of ``patches`` [N, D, H, W] / ``masks`` [N, D, H, W] independently."""
        pp = np.empty(patches.shape, np.float32)
        mm = np.empty(masks.shape, np.uint8)
        for n in range(len(patches)):
            pp[n], mm[n] = self(patches[n], masks[n])
        return pp, mm
