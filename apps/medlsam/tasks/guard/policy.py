"""Which requests change the server's state (and so need authorization), and which the viewers need open.

OHIF's MONAI Label panel sends no credentials: /info, /infer, /activelearning, GET /train, the DICOMweb
proxy's reads and /ohif stay open. Writes to the datastore, models, sessions and scoring, training,
batch runs, logs and dataset exports need the API token (or come from this machine without one).
"""

from __future__ import annotations

from monailabel.config import settings as ml_settings

OPEN_WRITES = ("/infer/", "/activelearning/", "/auth/")  # POSTs that only compute or log in
PROTECTED_READS = ("/datastore/dataset", "/logs", "/model/")  # whole-dataset export, server logs, weights


def _strip_prefix(path: str) -> str:
    prefix = ml_settings.MONAI_LABEL_API_STR.rstrip("/")
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def needs_authorization(method: str, path: str) -> bool:
    path = _strip_prefix(path)
    if method in ("GET", "HEAD", "OPTIONS"):
        return method != "OPTIONS" and path.startswith(PROTECTED_READS)
    return not path.startswith(OPEN_WRITES)
