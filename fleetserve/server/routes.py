"""The inference routes the REST fast path answers itself, before FastAPI: their templates (for
the security table and the OpenAPI document) and the one function that recognises them."""

from __future__ import annotations

FAST_PATH_ROUTES = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer", "/v2/pipelines/{name}/infer")


def infer_target(path: str) -> tuple[str, str, str | None] | None:
    """("models", model, version) for /v2/models/{m}[/versions/{v}]/infer, ("pipelines",
    pipeline, None) for /v2/pipelines/{p}/infer, else None."""
    parts = path.split("/")
    if parts[-1] != "infer" or parts[1] != "v2" or parts[2] not in ("models", "pipelines"):
        return None
    if len(parts) == 5:
        return parts[2], parts[3], None
    if len(parts) == 7 and parts[4] == "versions" and parts[2] == "models":
        return parts[2], parts[3], parts[5]
    return None
