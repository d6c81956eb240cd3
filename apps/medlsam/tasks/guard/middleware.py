"""One ASGI middleware in front of every route: Host check, cross-site write check, authorization, body cap.

- Host: a browser page whose name resolves to this machine (DNS rebinding) sends a foreign Host
  name; only loopback names, IP literals, this machine's names and `--conf allowed_hosts` pass.
- Origin: a browser write (POST/PUT/DELETE) from a page of another origin than the server's own or a
  configured CORS origin is refused; CORS alone does not stop "simple" cross-site POSTs.
- Authorization (see `policy`): writes and training need the API token (token mode) or must come
  from this machine (loopback mode); MONAI Label's Keycloak mode checks roles in the routes.
- Body size: a declared or streamed body over the upload limit gets 413 before it is stored.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from .config import GuardSettings
from .policy import needs_authorization

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Guard:
    """The request checks, shared by the middleware and the routes."""

    def __init__(self, settings: GuardSettings):
        self.settings = settings
        names = {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.host_names = LOOPBACK_NAMES | names | set(settings.allowed_hosts)

    def host_allowed(self, host_header: str | None) -> bool:
        if not host_header:
            return True  # HTTP/1.0 clients; browsers always send Host
        name = _host_name(host_header)
        return _is_ip(name) or name in self.host_names

    def origin_allowed(self, origin: str, scheme: str, host_header: str | None) -> bool:
        origin = origin.rstrip("/").lower()
        own = f"{scheme}://{(host_header or '').lower()}"
        return origin == own or origin in {o.lower() for o in self.settings.cors_origins}

    def token_valid(self, authorization: str | None) -> bool:
        if not authorization or not self.settings.api_token:
            return False
        _, _, token = authorization.strip().partition(" ")
        return hmac.compare_digest(token.strip().encode(), self.settings.api_token.encode())

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, message) when the request must be refused before any route sees it."""
        headers = Headers(scope=scope)
        method, path = scope["method"].upper(), scope["path"]
        host = headers.get("host")
        if not self.host_allowed(host):
            return 400, (f"Host {host!r} is not a name of this server; add it with --conf allowed_hosts "
                         "(protects against DNS rebinding from web pages)")
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and not self.origin_allowed(
                origin, scope.get("scheme", "http"), host):
            return 403, (f"cross-site {method} from origin {origin!r} refused; allow the origin with "
                         "--conf cors_origins <origin,...>")
        if not needs_authorization(method, path):
            return None
        mode = self.settings.auth_mode
        if mode == "token" and not self.token_valid(headers.get("authorization")):
            return 401, (f"{method} {path} needs the API token: send 'Authorization: Bearer <token>' "
                         "(3D Slicer: log in with any user name and the token as password)")
        if mode == "loopback" and not is_loopback((scope.get("client") or (None,))[0]):
            return 403, (f"{method} {path} is only accepted from this machine while no API token is set; "
                         "set MEDLSAM_API_TOKEN (or --conf api_token_file) to allow it from other machines")
        return None


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, detail=f"request body larger than the server's limit of {limit >> 20} MB "
                                     "(--conf max_upload_mb)")


class GuardMiddleware:
    """Checks every request, then hands it to the app's API (`api`) or, for `served_elsewhere` paths
    (DICOMweb proxy, OHIF, static files), to MONAI Label's own application."""

    def __init__(self, app, guard: Guard, api=None, served_elsewhere: tuple[str, ...] = ()):
        self.app, self.guard, self.api, self.served_elsewhere = app, guard, api, served_elsewhere

    def target(self, scope):
        path = scope["path"]
        if self.api is None or path == "/" or path.startswith(self.served_elsewhere):
            return self.app
        return self.api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)  # lifespan and websockets: MONAI Label's app
        refused = self.guard.refusal(scope)
        limit = self.guard.settings.max_upload_bytes + (1 << 20)  # the multipart envelope around the file
        length = Headers(scope=scope).get("content-length")
        if refused is None and length is not None and not length.isdigit():
            refused = 400, f"invalid Content-Length {length[:40]!r}"
        elif refused is None and length is not None and int(length) > limit:
            refused = 413, BodyTooLarge(limit).detail
        if refused:
            status, message = refused
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await JSONResponse({"detail": message}, status, headers=headers)(scope, receive, send)

        received = 0
        started = False

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.target(scope)(scope, capped_receive, tracked_send)
        except BodyTooLarge as exc:  # raised outside a route's body parsing
            if started:
                raise
            await JSONResponse({"detail": exc.detail}, 413)(scope, receive, send)
