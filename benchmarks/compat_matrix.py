"""Run the compatibility matrix (diffaccel/bench/compat.py) and write its table into README.md between markers.

    TRITON_INTERPRET=1 python benchmarks/compat_matrix.py          # rewrite the README table
    TRITON_INTERPRET=1 python benchmarks/compat_matrix.py --check  # exit 1 when the README table is stale
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

from diffaccel.bench.compat import MARK_BEGIN, MARK_END, readme_block, run_matrix  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_block(text: str, block: str) -> str:
    start, end = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
    return text[:start] + block + text[end:]


def main(argv: list[str]) -> int:
    text = README.read_text()
    new = replace_block(text, readme_block(run_matrix()))
    if "--check" in argv:
        return 0 if new == text else 1
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
