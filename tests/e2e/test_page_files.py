"""The tablet page's files, checked without a browser (these run where Chromium is absent too)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Set

from service import errors
from tests.support import PROJECT_ROOT

STATIC_DIR = PROJECT_ROOT / "service" / "static"
# Raised at startup or for bugs, never as an answer the page can act on.
NOT_FOR_CLIENTS = {"internal_error", "engine_error"}


def client_error_codes() -> Set[str]:
    codes = set()
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.ServiceError):
            codes.add(value.code)
    return codes - NOT_FOR_CLIENTS


def test_every_api_error_code_has_plain_words_on_the_page() -> None:
    script = (STATIC_DIR / "app.js").read_text(encoding="utf-8")
    table = script[script.index("var ERROR_TEXT = {") : script.index("};", script.index("var ERROR_TEXT = {"))]
    explained = set(re.findall(r"^\s*([a-z_]+): \[", table, flags=re.M))
    missing = client_error_codes() - explained
    assert not missing, "app.js ERROR_TEXT lacks a message for: {}".format(sorted(missing))
    assert "overloaded" in explained and "invalid_roi" in explained  # the parse itself worked


def test_page_loads_nothing_from_other_sites() -> None:
    # Clinics may be offline: no CDN, no web font, no analytics.
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC_DIR / name).read_text(encoding="utf-8")
        external = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text, flags=re.I)
        assert external == [], "{} refers to {}".format(name, external)
        assert "@font-face" not in text and "@import" not in text, name


def test_app_serves_the_page_and_its_assets(client: Any) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for asset, content_type in (("static/app.js", "javascript"), ("static/style.css", "text/css")):
        assert 'src="{}"'.format(asset) in page.text or 'href="{}"'.format(asset) in page.text, asset
        response = client.get("/" + asset)
        assert response.status_code == 200, asset
        assert content_type in response.headers["content-type"], (asset, response.headers["content-type"])
        assert response.content == (STATIC_DIR / Path(asset).name).read_bytes()
