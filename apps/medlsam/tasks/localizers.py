"""Which localizer answers a request: MedLAM (trained weights + templates) or registration of the
annotated supports to the query (no weights).

`auto` picks MedLAM when weights other than the committed demo ones are in use (the official
`medlam.pth`, weights given with `--conf medlam_checkpoint`, or weights the trainer task published),
otherwise registration: the demo MedLAM was trained on generated CT only and places no useful box on
real CT, while registration measured better on both real and generated CT (README, "Which localizer").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlsam.paths import DEMO_MEDLAM

from .errors import bad_request
from .settings import LOCALIZERS, AppSettings


def localizer_param(value: Any, default: str) -> str:
    """The request's `localizer` ('medlam', 'registration' or 'auto'; empty: the server's); 422 otherwise."""
    if value in (None, ""):
        return default
    name = str(value).strip().lower()
    if name not in LOCALIZERS:
        raise bad_request(f"localizer must be one of {', '.join(LOCALIZERS)}, got {value!r}")
    return name


def resolve(choice: str, settings: AppSettings, checkpoint: Path) -> str:
    """'medlam' or 'registration' for a choice; `checkpoint` is the MedLAM weights file in use."""
    if choice != "auto":
        return choice
    if settings.medlam_configured or not _same_file(checkpoint, DEMO_MEDLAM):
        return "medlam"
    return "registration"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
