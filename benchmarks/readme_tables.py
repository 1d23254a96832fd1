"""Regenerate (``--write``) or check (``--check``) README.md's performance section from benchmarks/results/*.json.

The section lies between the markers of :mod:`diffaccel.bench.readme_tables`; only GPU results count.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffaccel.bench.readme_tables import current_section, generate, replace_section  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="rewrite the section in README.md")
    group.add_argument("--check", action="store_true", help="exit 1 when README.md is not what the results give")
    args = parser.parse_args()
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    section = generate(ROOT / "benchmarks" / "results")
    if args.write:
        readme_path.write_text(replace_section(readme, section))
        print(f"wrote the performance section of {readme_path}")
    elif current_section(readme) != section:
        print("README.md's performance section is out of date: run python benchmarks/readme_tables.py --write")
        sys.exit(1)
