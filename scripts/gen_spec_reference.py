"""Write docs/spec_reference.md from ``AdapterSpec.model_json_schema()``.

    python scripts/gen_spec_reference.py          # rewrite the file
    python scripts/gen_spec_reference.py --check  # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moleforge import AdapterSpec
from moleforge.cli.schema_doc import render_reference

TARGET = Path(__file__).resolve().parents[1] / "docs" / "spec_reference.md"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    text = render_reference(AdapterSpec.model_json_schema())
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.is_file() else ""
        if current != text:
            print(f"{TARGET} is out of date; run python scripts/gen_spec_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
