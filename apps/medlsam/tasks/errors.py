"""Turn library errors into HTTP answers a client can act on."""

from __future__ import annotations

import contextlib
import logging

from fastapi import HTTPException

from medlsam.medlam.templates import TemplateMismatchError

logger = logging.getLogger(__name__)


def bad_request(message: str, status: int = 422) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


@contextlib.contextmanager
def client_errors(what: str):
    """Map input problems raised inside `what` to 4xx with the library's message."""
    try:
        yield
    except HTTPException:
        raise
    except TemplateMismatchError as exc:
        raise bad_request(f"{what}: {exc}", 409) from exc
    except FileNotFoundError as exc:
        raise bad_request(f"{what}: {exc}", 404) from exc
    except (ValueError, KeyError, TypeError) as exc:
        message = exc.args[0] if exc.args else repr(exc)
        raise bad_request(f"{what}: {message}", 422) from exc
