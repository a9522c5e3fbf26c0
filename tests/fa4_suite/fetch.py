"""Download FA4's own test file (``tests/cute/test_flash_attn.py`` of Dao-AILab/flash-attention)
at the pinned commit next to this script, and check its sha256. fa4aot does not ship third-party
code: the file is fetched, never committed (it is listed in ``.gitignore``).

    python tests/fa4_suite/fetch.py            # writes tests/fa4_suite/test_flash_attn.py
    python tests/fa4_suite/fetch.py FILE       # offline: a copy obtained elsewhere, checked the same way
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

#: the newest commit of the repository available when the suite was set up (tag fa4-v4.0.0.beta27;
#: README.md says why this one)
COMMIT = "0251105a2fb19d2957484b7f023cd8c115286ced"
URL = f"https://raw.githubusercontent.com/Dao-AILab/flash-attention/{COMMIT}/tests/cute/test_flash_attn.py"
SHA256 = "090a90d965ac1e8382bbb65ca3a8faf33552a73a7fa6956fa12de3bdc81a9cec"
TARGET = Path(__file__).with_name("test_flash_attn.py")


def main(argv: list[str]) -> int:
    if TARGET.exists() and hashlib.sha256(TARGET.read_bytes()).hexdigest() == SHA256:
        print(f"{TARGET}: present, sha256 matches")
        return 0
    source = argv[0] if argv else URL
    try:
        if argv:
            body = Path(source).read_bytes()
        else:
            with urllib.request.urlopen(URL, timeout=60) as r:  # noqa: S310 - a fixed https URL
                body = r.read()
    except OSError as e:  # (URLError is one)
        print(f"error: cannot read {source}: {e}; nothing written (offline: pass a copy's path)", file=sys.stderr)
        return 1
    got = hashlib.sha256(body).hexdigest()
    if got != SHA256:
        print(f"error: {source} has sha256 {got}, expected {SHA256}; nothing written", file=sys.stderr)
        return 1
    tmp = TARGET.with_suffix(".tmp")
    tmp.write_bytes(body)
    os.replace(tmp, TARGET)  # never a half-written test file
    print(f"{TARGET}: from {source}, sha256 matches (commit {COMMIT[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
