"""Cerebral microbleed (CMB) detection algorithms of the reference method (Xia et al. 2023, JMRI).

Stage I: 2.5D Fast Radial Symmetry Transform (``frst``), brain-edge erosion, candidate maxima,
7x7x7 FRST cubes screened by one convolution layer, Frangi vesselness (``candidates``), and the
hand-crafted baseline of the paper's Table 2 (``handcrafted``). Stage II: the V-Net with a
classification output from the global max-pool of its segmentation (``vnet``) and the ResNet
comparator (``resnet``).

Everything here is plain numpy / scipy / torch: no MONAI Deploy. Operators adapt these functions.
"""

from core.errors import CMBError


class DetectionError(CMBError):
    """CMB detection cannot proceed on this input (wrong dimensions, empty brain mask, ...).

    Defined here because ``core/errors.py`` (shared, not ours to change) has no detection-layer type;
    it may move there.
    """
