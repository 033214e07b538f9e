"""What a hospital's error may tell the coordinator: the problem, never a site path.

File and folder names at a hospital can carry patient identifiers (``MRN-0042-chest.png``)
and reveal the site's layout, so an error that leaves the site names the problem and a
site-local reference instead: ``image 8 of class 'malignant': not a readable image``. The
site's own log keeps the full message. Two layers:

1. a :class:`~fedclinic.errors.DataError` raised for one file carries ``shared``, the
   message with that site-local reference (the data sources build it);
2. every other message is scrubbed: each path the hospital config names (``data-path``,
   ``state-dir``, the shared-file paths), with whatever follows it, becomes ``<data-path>``
   etc., and any other absolute path becomes ``<path>``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedclinic.config import HospitalConfig
from fedclinic.errors import DataError

#: hospital config keys that name site paths, in the order they are replaced
PATH_KEYS = (
    "data_path", "state_dir", "prior_path", "public_data_path", "knowledge_path",
    "dicom_label_sheet", "dicom_masks",
)  # fmt: skip
# A path runs until whitespace, a quote, a colon (``file:42``) or a closing bracket.
_REST = r"(?:/[^\s'\":,;()\[\]]*)*"
_ABSOLUTE = re.compile(r"(?<![\w.<>-])/[^\s'\":,;()\[\]]+")


def scrub(message: str, hospital: HospitalConfig | None = None) -> str:
    """``message`` with every site path replaced by a placeholder (layer 2)."""
    text = message
    for key in PATH_KEYS if hospital is not None else ():
        configured = str(getattr(hospital, key) or "")
        if not configured:
            continue
        forms = {configured.rstrip("/") or "/"}
        for path in (Path(configured).expanduser(), Path(configured).expanduser().resolve()):
            forms.add(str(path))
        placeholder = f"<{key.replace('_', '-')}>"
        for form in sorted(forms, key=len, reverse=True):  # longest first: /a/b before /a
            text = re.sub(re.escape(form) + _REST, placeholder, text)
    return _ABSOLUTE.sub("<path>", text)


def shareable(err: BaseException, hospital: HospitalConfig | None) -> str:
    """The one line a hospital sends to the coordinator for ``err``."""
    if isinstance(err, DataError) and err.shared:
        return scrub(err.shared, hospital)
    return scrub(str(err), hospital)
