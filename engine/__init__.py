"""Image-side code of ltdiff-node: engines, pixels in and out of DICOM, derived series."""

from engine._version import package_version

__version__ = package_version()
"""The ltdiff-node version: pyproject.toml's, through the installed package's metadata."""
