"""Network side of ltdiff-node: DICOM services, spool, series assembly, routing, jobs, export."""

from engine import __version__

__all__ = ["__version__"]
