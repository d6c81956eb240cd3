"""The login routes 3D Slicer's MONAI Label module speaks, for the app's shared API token.

Slicer first asks `GET /auth/`; with `{"enabled": true}` it shows a login dialog, posts the user name
and password to `/auth/token` and sends `Authorization: <token_type> <access_token>` from then on,
checking it with `GET /auth/token/valid`. Here the password is the API token (any user name).
Only installed in token mode; MONAI Label's Keycloak mode has its own routes.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.security import OAuth2PasswordRequestForm

from .middleware import Guard


def auth_router(guard: Guard) -> APIRouter:
    router = APIRouter(prefix="/auth", tags=["Auth"])

    @router.get("/", summary="Check If Auth is Enabled")
    def auth_enabled():
        return {"enabled": True, "client_id": "medlsam", "realm": "api-token"}

    @router.post("/token", summary="Log in: any user name, the API token as password")
    def access_token(form: OAuth2PasswordRequestForm = Depends()):
        if not hmac.compare_digest(form.password.encode(), guard.settings.api_token.encode()):
            raise HTTPException(401, detail="wrong password: use the server's API token",
                                headers={"WWW-Authenticate": "Bearer"})
        return {"access_token": guard.settings.api_token, "token_type": "Bearer"}

    @router.get("/token/valid", summary="Check If current token is Valid")
    def token_valid(request: Request):
        if not guard.token_valid(request.headers.get("authorization")):
            raise HTTPException(401, detail="missing or wrong API token", headers={"WWW-Authenticate": "Bearer"})
        return {"username": "api-token", "roles": ["api-token"]}

    return router
