"""Parse every .bicep file under infra/ with pycep-parser and print the parse trees as JSON.

Run by the interpreter of `.venv-infra` (where pycep-parser lives), e.g.
    .venv-infra/bin/python infra/check_bicep.py [infra-dir]
tests/test_infra.py calls it in a subprocess so the app's venv never imports pycep or checkov.
Output: {"files": {"<relative path>": {"ok": true, "tree": {...}} | {"ok": false, "error": "..."}}}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def parse_all(infra_dir: Path) -> dict:
    from pycep import BicepParser  # imported here so `--help`-style failures name the venv, not a traceback

    parser = BicepParser()
    files: dict[str, dict] = {}
    for path in sorted(infra_dir.rglob("*.bicep")):
        rel = path.relative_to(infra_dir).as_posix()
        try:
            tree = parser.parse(file_path=path)
        except Exception as exc:  # pycep raises lark errors of several kinds
            files[rel] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            files[rel] = {"ok": True, "tree": tree}
    return {"files": files}


def main(argv: list[str]) -> int:
    infra_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    json.dump(parse_all(infra_dir), sys.stdout, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
