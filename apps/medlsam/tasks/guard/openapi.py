"""The published OpenAPI schema, made true for error answers.

Decision: every error body is `{"detail": ...}`. The app's own errors carry a sentence (a string);
FastAPI's request-validation errors keep their list of `{loc, msg, type}`. The schema publishes one
`ErrorBody` whose `detail` is either, for every error status the server answers with.
"""

from __future__ import annotations

ERROR_STATUSES = {
    "400": "Malformed request (e.g. a Host name that is not this server's)",
    "401": "API token missing or wrong",
    "403": "Not allowed from this client (origin, address or role)",
    "404": "Unknown image, label, model, session or route",
    "405": "Not supported by this app",
    "409": "Templates are being updated; retry after Retry-After seconds",
    "413": "Upload over the size or voxel limit",
    "422": "Invalid input, with a message naming the problem",
    "429": "A training run is already running",
    "503": "Busy: too many long requests; retry after Retry-After seconds",
}


def error_body_schema() -> dict:
    return {
        "title": "ErrorBody",
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"title": "Detail", "anyOf": [
            {"type": "string", "description": "what went wrong, for a person"},
            {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"},
             "description": "FastAPI's request validation errors"},
        ]}},
    }


def patch_schema(schema: dict) -> dict:
    """Add ErrorBody and document it for every operation's error statuses (in place)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.setdefault("ValidationError", {
        "title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
        "properties": {"loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                       "msg": {"type": "string"}, "type": {"type": "string"}}})
    components["ErrorBody"] = error_body_schema()
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for status, description in ERROR_STATUSES.items():
                operation["responses"][status] = {
                    "description": description, "content": {"application/json": {"schema": ref}}}
    return schema


def install_schema_patch(app) -> None:
    original = app.openapi

    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = patch_schema(original())
        return app.openapi_schema

    app.openapi_schema = None
    app.openapi = openapi
