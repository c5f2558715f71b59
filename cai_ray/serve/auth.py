"""Optional bearer-token auth: the token comes from an environment variable or a file.

The driver resolves the token and hands the ingress only its sha256, so the secret itself never
travels through the Serve controller or appears in the app config.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from cai_ray.errors import ConfigError
from cai_ray.serve.schemas import ApiError


def load_token(*, env: str | None, file: str | None) -> str | None:
    """The token from `file` (when set) or the variable `env` (when set and non-empty)."""
    if file:
        path = Path(file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the API token file: {exc.strerror or exc}",
                where="serve.auth_token_file",
                hint="point it at a readable file holding the token, or unset it",
            ) from None
        if not token:
            raise ConfigError("the API token file is empty", where=str(path))
        return token
    if env:
        return os.environ.get(env, "").strip() or None
    return None


def token_digest(token: str | None) -> str | None:
    """sha256 hex of the token (None: auth off)."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def check_bearer(header: str | None, digest: str | None) -> None:
    """Raise a 401 ApiError unless `header` is `Bearer <token>` matching `digest` (None: open)."""
    if digest is None:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            type="authentication_error",
            code="missing_api_key",
        )
    given = hashlib.sha256(token.strip().encode()).hexdigest()
    if not hmac.compare_digest(given, digest):
        raise ApiError(
            401, "invalid API token", type="authentication_error", code="invalid_api_key"
        )
