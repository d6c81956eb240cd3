"""Turn errors into HTTP answers: the client's mistakes are 4xx, the server's faults 5xx, each with a message."""

from __future__ import annotations

import contextlib
import logging

from fastapi import HTTPException

from medlsam.errors import BusyError, ConfigurationError, InputError, NotFoundError
from medlsam.medlam.templates import TemplateMismatchError

logger = logging.getLogger(__name__)


def bad_request(message: str, status: int = 422) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def http_error(exc: BaseException, what: str) -> HTTPException:
    """The HTTP answer for an error raised while serving `what`."""
    if isinstance(exc, HTTPException):
        return exc
    if isinstance(exc, (TemplateMismatchError, BusyError)):
        return bad_request(f"{what}: {exc}", 409)
    if isinstance(exc, ConfigurationError):  # checked before InputError: both are ValueErrors
        logger.error("%s: server configuration problem: %s", what, exc)
        return bad_request(f"{what}: the server is not set up for this request: {exc}", 500)
    if isinstance(exc, NotFoundError):
        return bad_request(f"{what}: {exc}", 404)
    if isinstance(exc, InputError):
        return bad_request(f"{what}: {exc}", 422)
    logger.exception("%s: internal error", what, exc_info=exc)
    return bad_request(f"{what}: internal server error ({type(exc).__name__}: {exc})", 500)


@contextlib.contextmanager
def request_errors(what: str):
    """Map every error raised inside `what` to an HTTPException with the right class and a message."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every error leaves as an HTTP answer
        raise http_error(exc, what) from exc
