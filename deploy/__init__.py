"""Deployment side of the product: the DICOM node that sits between PACS and the app."""
