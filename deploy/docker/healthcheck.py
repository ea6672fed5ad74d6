"""Container healthcheck: exit 0 only when /readyz answers 200 (no curl in the images)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = "http://127.0.0.1:{}/readyz".format(os.environ.get("PORT", "8000"))
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - fixed loopback URL
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
