"""Physics-based simulator of multi-echo GRE brain studies with ground truth.

``phantom``  digital brain per subject (anatomy, tissues, veins, lesions, head, air, bone)
``acquire``  field by dipole convolution, multi-echo GRE magnitude and phase with noise
``dicom_writer``  scanner-like DICOM for several vendors' conventions
``study``    the data types that pass between them
"""
