"""Fix a bug of @firestore-emulator/server 0.3.15 where it is installed (tests only).

Its `v1Transform` returns after the first field transform instead of continuing the loop, so a
write with `timestamp=SERVER_TIMESTAMP` and `createdAt=SERVER_TIMESTAMP` stores `timestamp`
only. The fix turns those `return;` into `continue;` inside that method. Idempotent.
"""

from __future__ import annotations

import sys
from pathlib import Path


def patch(path: Path) -> bool:
    lines = path.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if "v1Transform(date, transforms) {" in line)
    end = next(i for i in range(start + 1, len(lines)) if lines[i].rstrip() == "  }")
    changed = False
    for i in range(start, end):
        if lines[i].strip() == "return;":
            lines[i] = lines[i].replace("return;", "continue;")
            changed = True
    path.write_text("".join(lines))
    return changed


if __name__ == "__main__":
    root = Path(sys.argv[1]) / "@firestore-emulator" / "server" / "dist"
    for name in ("index.js", "index.mjs"):
        state = "patched" if patch(root / name) else "already patched"
        print(f"{root / name}: {state}")
