"""Titles that an evaluation report carries and `ltdiff-node bars` reads back.

No third-party imports: `bars` reads a `report.json` and must run without the `evaluate` extra.
"""

from __future__ import annotations

from typing import Final

REPEAT_ROW: Final = "Repeat scan (ceiling)"
"""The row of the repeat acquisition, the agreement a second real scan reaches."""

CLASS_TITLES: Final = {
    "firstorder": "First order",
    "glcm": "GLCM",
    "glrlm": "GLRLM",
    "glszm": "GLSZM",
    "gldm": "GLDM",
    "ngtdm": "NGTDM",
    "gradient": "Gradient (FO)",
    "all": "All",
}
"""Column titles of the feature classes (`radiomics_features.FEATURE_CLASSES`) and of "all"."""
