"""Container ``HEALTHCHECK``: exit 0 when the local server's ``/health`` answers 200, else 1.

The runtime image has no curl; this uses the standard library only and reads the port from
``ENCAPURE_PORT`` so the check follows the setting the server itself listens on.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float = 4.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def main() -> int:
    port = os.environ.get("ENCAPURE_PORT", "8000")
    return 0 if check(f"http://127.0.0.1:{port}/health") else 1


if __name__ == "__main__":
    sys.exit(main())
