"""Error classes that say whose problem it is: the caller's input or the server's set-up.

Servers map `InputError` to HTTP 4xx (`NotFoundError`: 404) and `ConfigurationError` to HTTP 5xx;
both carry a message meant for a person. Both stay `ValueError` subclasses (and
`ModelFileMissing` a `FileNotFoundError`) so callers that only know the built-in types keep working.
"""

from __future__ import annotations


class MedLSAMError(Exception):
    """Base class of the errors this package raises on purpose."""


class InputError(MedLSAMError, ValueError):
    """Something the caller gave is wrong: a file that is not CT, an unknown organ, a bad box."""


class NotFoundError(InputError, LookupError):
    """The caller named something that does not exist (an image id, an organ without a template)."""


class ConfigurationError(MedLSAMError, ValueError):
    """The server or command is set up wrongly: an unreadable checkpoint, a broken label map."""


class ModelFileMissing(ConfigurationError, FileNotFoundError):
    """A checkpoint the configuration needs is not where it should be."""


class BusyError(MedLSAMError, RuntimeError):
    """The request cannot be served right now (e.g. templates are being rebuilt); retry later."""
