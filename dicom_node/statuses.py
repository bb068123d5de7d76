"""Named DICOM status codes the node answers with (PS3.4 Annex B.2.3 and PS3.7 Annex C).

Handlers return these constants, never bare numbers, so every failure path reads as what it means.
"""

from typing import Final

SUCCESS: Final = 0x0000
#: Refused: SOP Class not supported (PS3.7 Annex C.5): the request's Affected SOP Class UID is not
#: the abstract syntax of the presentation context it came on.
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
#: Refused: Out of Resources. The sender keeps its copy and retries later (disk full, spool
#: unwritable, database unavailable).
OUT_OF_RESOURCES: Final = 0xA700
#: Error: Data Set does not match SOP Class.
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
#: Error: Cannot understand (the C-STORE failure range is 0xC000-0xCFFF). Sub-codes say why.
CANNOT_UNDERSTAND: Final = 0xC210
CANNOT_UNDERSTAND_INVALID_UID: Final = 0xC211
CANNOT_UNDERSTAND_UID_MISMATCH: Final = 0xC212
#: The C-STORE request itself (its command set) carries an Affected SOP Instance or Class UID
#: that is missing, empty, over 64 characters or not a UID (answered by dicom_node.dimse_guard).
CANNOT_UNDERSTAND_INVALID_REQUEST_UID: Final = 0xC213
#: Refused: the dataset exceeds a reception limit ([listener.limits]: inflated size, sequence
#: nesting, element count). Resending the same instance gets the same answer.
CANNOT_UNDERSTAND_LIMIT_EXCEEDED: Final = 0xC214
