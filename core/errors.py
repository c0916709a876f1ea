"""Exception types, one per layer, with messages a PACS administrator can act on.

Every message is a single line that names what was wrong with the input and, where it helps,
what to do about it. The app's entry point prints ``str(exc)`` and exits non-zero.
"""


class CMBError(Exception):
    """Base class of every error the product raises on purpose."""


class DicomInputError(CMBError):
    """The DICOM input cannot be used (no phase series, missing slice, unknown scaling, ...)."""


class ReconstructionError(CMBError):
    """QSM reconstruction cannot proceed on this input (volume too small, constant phase, ...)."""


class ConfigError(CMBError):
    """A configuration file or command-line option is invalid."""


class NiftiInputError(CMBError):
    """The NIfTI (+ JSON sidecar) research input cannot be used (phase without magnitude, missing
    EchoTime, mixed image sizes, ...)."""
