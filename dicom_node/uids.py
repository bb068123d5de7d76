"""UID validation (PS3.5 Section 9.1) before a UID is used in a file path or a database key."""

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID: digits and dots, no leading zeros, <= 64 chars.

    Only such strings may become file names: they can contain no '/', '..' or NUL.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None
