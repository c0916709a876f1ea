"""The MONAI Deploy application: DICOM study in, QSM + microbleed findings out."""

__version__ = "0.1.0"
