"""Image-side code of ltdiff-node: engines, pixels in and out of DICOM, derived series."""

__version__ = "0.1.0"
