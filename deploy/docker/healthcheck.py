"""Container healthcheck: exit 0 only when /readyz answers 200 (no curl in the images).

With TLS on (ANEMIA_CREDENTIALS_DIR or ANEMIA_TLS_CERTFILE, the images' default) the check speaks
HTTPS to loopback and does not verify the certificate: it is the box asking itself.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def main() -> int:
    tls = bool(os.environ.get("ANEMIA_CREDENTIALS_DIR") or os.environ.get("ANEMIA_TLS_CERTFILE"))
    url = "{}://127.0.0.1:{}/readyz".format("https" if tls else "http", os.environ.get("PORT", "8000"))
    context = ssl._create_unverified_context() if tls else None  # noqa: S323 - loopback, own certificate
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as response:  # noqa: S310 - fixed loopback URL
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
