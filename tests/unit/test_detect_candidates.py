"""Stage-I helpers (core.detect.candidates): erosion, candidate maxima, cubes, Frangi, ConvScreen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.detect.candidates import (
    ConvScreen,
    cube_shapes,
    erode_brain_mask,
    extract_cubes,
    find_candidates,
    frangi_at_voxels,
    frangi_vesselness,
)
from core.detect.frst import frst_25d
from tests.unit.test_detect_frst import sphere_and_tube


def test_erosion_removes_five_voxel_shell() -> None:
    mask = np.zeros((30, 30, 30), bool)
    mask[5:25, 5:25, 5:25] = True
    er = erode_brain_mask(mask, voxels=5)
    assert er.sum() == 10**3
    assert er[10:20, 10:20, 10:20].all()
    assert erode_brain_mask(np.ones((12, 12, 12), bool), 5).sum() == 2**3  # array edge = outside


def test_candidates_at_sphere_centres() -> None:
    shape = (40, 40, 24)
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    centres = [(10, 12, 12), (28, 26, 10)]
    vol = np.zeros(shape, np.float32)
    for c in centres:
        vol[sum((gi - ci) ** 2 for gi, ci in zip(g, c)) <= 2.5**2] = 1.0
    vol[:, 34:36, 17:19] = 1.0  # a vessel along i
    f = frst_25d(vol, (1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0))
    found = find_candidates(f, np.ones(shape, bool), threshold=0.5, min_distance_mm=3.0)
    assert sorted(map(tuple, found.tolist())) == sorted(centres)
    # A mask excluding the second sphere removes it.
    mask = np.ones(shape, bool)
    mask[20:, :, :] = False
    assert find_candidates(f, mask, 0.5, 3.0).tolist() == [[10, 12, 12]]


def test_cubes_shape_centring_and_padding() -> None:
    vol = np.arange(10 * 11 * 12, dtype=np.float32).reshape(10, 11, 12)
    cubes = extract_cubes(vol, np.array([[5, 5, 5], [0, 0, 11]]), size=7)
    assert cubes.shape == (2, 7, 7, 7)
    assert cubes[0, 3, 3, 3] == vol[5, 5, 5]
    np.testing.assert_array_equal(cubes[0], vol[2:9, 2:9, 2:9])
    assert cubes[1, 3, 3, 3] == vol[0, 0, 11]
    assert cubes[1, 0, 0, 0] == 0.0  # zero padding outside the volume
    assert cubes[1, 4, 4, 2] == vol[1, 1, 10]
    edge = extract_cubes(vol, np.array([[0, 0, 11]]), size=7, pad_mode="edge")
    assert edge[0, 0, 0, 6] == vol[0, 0, 11]


def test_frangi_higher_on_tube_than_sphere() -> None:
    for sp in ((1.0, 1.0, 1.0), (0.5, 0.5, 1.0)):
        vol, c = sphere_and_tube(sp, fov_mm=24.0)
        v = frangi_vesselness(vol, sp, sigmas_mm=(1.0, 1.5))
        assert v.shape == vol.shape
        tube_idx = (int(8 / sp[0]), int(8 / sp[1]), vol.shape[2] // 3)
        assert v[tube_idx] > 5 * v[c], (sp, v[tube_idx], v[c])


def test_conv_screen_shapes_and_learns_sphere_vs_tube_cubes() -> None:
    torch.manual_seed(0)
    vol, c = sphere_and_tube((1.0, 1.0, 1.0))
    f = frst_25d(vol, (1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0), normalise=False)
    f = f / f.max()
    # Positives: cubes at and near the sphere centre; negatives: cubes on the tube.
    pos = [(c[0] + a, c[1] + b, c[2]) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    neg = [(8, 8, k) for k in range(4, 28, 3)]
    x = torch.from_numpy(extract_cubes(f, np.array(pos + neg)))[:, None] * 10
    y = torch.tensor([1.0] * len(pos) + [0.0] * len(neg))
    net = ConvScreen()
    assert sum(p.numel() for p in net.parameters()) == 233
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert net(x).shape == (len(pos) + len(neg),)
    assert losses[-1] < 0.5 * losses[0]
    assert ((net(x) > 0).float() == y).all()


def test_cube_shapes_are_contrast_invariant_and_differ_for_sphere_and_tube() -> None:
    vol, c = sphere_and_tube((1.0, 1.0, 1.0))
    f = frst_25d(vol, (1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0), normalise=False)
    cubes = extract_cubes(f, np.array([c, (8, 8, 16)]))
    shapes = cube_shapes(cubes)
    assert shapes.shape == (2, 7, 7, 7)
    assert set(np.unique(shapes)) <= {0.0, 1.0}
    np.testing.assert_array_equal(cube_shapes(cubes * 1e-3), shapes)
    assert shapes[0, 3, 3, 3] == 1.0 and shapes[1].max() == 1.0
    # The sphere's shape is compact (within 2 voxels of the centre); the tube's runs along k.
    assert shapes[0][:, :, [0, 6]].sum() == 0
    assert shapes[1][:, :, [0, 6]].sum() > 0
    assert cube_shapes(np.zeros((1, 7, 7, 7))).sum() == 0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 0.9, 1.8)])
def test_frangi_at_voxels_equals_skimage_per_crop(spacing):
    """The batched vesselness (one call for every candidate) gives what skimage's frangi gives on
    each candidate's crop, at the candidate, including crops clipped at the volume border and
    both polarities."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    vol = ndimage.gaussian_filter(rng.normal(0, 1, (40, 44, 30)), 1.0).astype(np.float32)
    ii, jj, kk = np.ogrid[:40, :44, :30]
    vol += 4.0 * np.exp(-((ii - 20) ** 2 + (kk - 15) ** 2) / 2.0).astype(np.float32)  # tube along j
    vol -= 4.0 * np.exp(-((ii - 10) ** 2 + (jj - 30) ** 2 + (kk - 12) ** 2) / 2.0).astype(np.float32)  # dark blob
    vox = np.array([[20, 22, 15], [1, 2, 3], [39, 43, 29], [10, 30, 12], [5, 5, 5], [30, 10, 20]])
    bright = np.array([True, True, False, False, True, False])
    fast = frangi_at_voxels(vol, vox, bright, spacing)
    sp = np.asarray(spacing)
    half = np.maximum(np.ceil(6.0 / sp).astype(int), 3)
    ref = []
    for c, b in zip(vox, bright):
        sl = tuple(slice(max(int(ci) - h, 0), min(int(ci) + h + 1, n)) for ci, h, n in zip(c, half, vol.shape))
        v = frangi_vesselness(vol[sl], spacing, (0.5, 1.0, 1.5), bright=bool(b))
        ref.append(v[tuple(int(ci) - s.start for ci, s in zip(c, sl))])
    assert np.allclose(fast, ref, atol=1e-6, rtol=1e-5)
    assert fast[0] > 0.1  # the bright tube


def test_frangi_fields_at_voxels_equals_the_full_fields_read_there():
    from core.detect.candidates import frangi_fields
    rng = np.random.default_rng(11)
    crops = rng.normal(size=(9, 11, 13, 12))
    at = np.stack([rng.integers(0, n, size=9) for n in crops.shape[1:]], axis=1)
    for bright in (True, False):
        full = frangi_fields(crops, (0.5, 1.0, 1.5), bright=bright)
        got = frangi_fields(crops, (0.5, 1.0, 1.5), bright=bright, at=at)
        assert got.shape == (9,)
        assert np.array_equal(got, full[np.arange(9), at[:, 0], at[:, 1], at[:, 2]])
