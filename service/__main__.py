"""``python -m service``: check the configuration, then serve with one uvicorn worker.

One process by design: the inference thread owns the backend (and on a Jetson the CUDA context
and the GPU's memory); several workers would each load a copy and fight over one small GPU.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, List, Optional

from service.config import Settings, SettingsError, load_settings
from service.errors import EngineError
from service.logging_setup import configure_logging


def prepare(settings: "Settings") -> int:
    """Build the engine for the configured model, precision and backend unless one matches."""
    from service.model_info import ModelInfo
    from service.startup import resolve_engine

    try:
        model = ModelInfo.from_onnx(settings.model)
        engine = resolve_engine(settings.model_copy(update={"auto_build": True}), model)
    except EngineError as exc:
        print("error: {}".format(exc.message), file=sys.stderr)
        return 2
    entry = engine.entry
    print(
        "engine ready: {} ({} {}, {:.1f} MB, built {})".format(
            engine.path, entry.backend, entry.precision, entry.file_size_bytes / 1e6, entry.built_at
        )
    )
    return 0


def apply_credentials(settings: "Settings", announce: bool) -> "Settings":
    """With ``ANEMIA_CREDENTIALS_DIR``: make the box's key, token and certificate if missing and
    use them wherever no explicit setting says otherwise. The key is shown once, when it is made."""
    if settings.credentials_dir is None:
        return settings
    from pydantic import SecretStr

    from service.credentials import API_KEY_FILE, ensure_credentials

    credentials = ensure_credentials(settings.credentials_dir, settings.scrape_dir)
    update: Dict[str, Any] = {}
    if settings.api_key is None:
        update["api_key"] = SecretStr(credentials.api_key)
    if settings.metrics_token is None:
        update["metrics_token"] = SecretStr(credentials.metrics_token)
    if settings.tls_certfile is None and settings.tls_keyfile is None:
        update.update(tls_certfile=credentials.certfile, tls_keyfile=credentials.keyfile)
    if announce:
        logger = logging.getLogger("service.credentials")
        if API_KEY_FILE in credentials.created and "api_key" in update:
            # The only time the key is printed: a person at the box's console copies it into the
            # tablet page once. It stays in the file (owner-only) for the next start.
            logger.warning(
                "generated an API key; it is shown only this once (it stays in {})".format(settings.credentials_dir / API_KEY_FILE),
                extra={"api_key": credentials.api_key},
            )
        logger.info(
            "TLS certificate",
            extra={
                "certfile": str(update.get("tls_certfile", settings.tls_certfile)),
                "sha256_fingerprint": credentials.fingerprint_sha256,
                "not_after": credentials.not_after.isoformat(),
                "generated": credentials.created,
            },
        )
    return settings.model_copy(update=update)


def init(settings: "Settings") -> int:
    """``python -m service init``: make the credentials now (first-boot scripts, ExecStartPre)."""
    if settings.credentials_dir is None:
        print("error: set ANEMIA_CREDENTIALS_DIR to the directory for the key and certificate", file=sys.stderr)
        return 2
    from service.credentials import API_KEY_FILE, ensure_credentials

    credentials = ensure_credentials(settings.credentials_dir, settings.scrape_dir)
    key_path = settings.credentials_dir / API_KEY_FILE
    if API_KEY_FILE in credentials.created:
        print("API key (shown only this once; it stays in {}): {}".format(key_path, credentials.api_key))
    else:
        print("API key: in {} (not shown again)".format(key_path))
    print("TLS certificate {} sha256 fingerprint {} valid until {}".format(
        credentials.certfile, credentials.fingerprint_sha256, credentials.not_after.date()))
    return 0


def main(argv: "Optional[List[str]]" = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        settings = load_settings()
    except SettingsError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    if args[:1] == ["prepare"]:
        return prepare(settings)
    if args[:1] == ["init"]:
        return init(settings)
    if args:
        print("usage: python -m service [prepare | init]", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        settings = apply_credentials(settings, announce=True)
    except (OSError, ValueError) as exc:
        print("error: credentials in {}: {}".format(settings.credentials_dir, exc), file=sys.stderr)
        return 2
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    if settings.tls_certfile is None and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("service").warning(
            "serving plain HTTP on {}: anyone on this network can read the pictures and results; "
            "set ANEMIA_CREDENTIALS_DIR (or ANEMIA_TLS_CERTFILE/KEYFILE) for HTTPS".format(host)
        )
    from service.app import create_app

    try:
        app = create_app(settings)
    except EngineError as exc:
        print("error: {}".format(exc.message), file=sys.stderr)
        return 2
    from service.edge import run_server

    run_server(app, settings, host, port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
