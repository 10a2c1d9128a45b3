"""Print the pinned-by-pyproject requirements of the fleet image, one per line.

The image installs only third-party dependencies with pip; ActionFleet's own packages are
copied as source, so a code change never invalidates the (large) dependency layer. This
reads ``[project] dependencies`` plus the requested extras from pyproject.toml and expands
the project's self-references (``actionfleet[worker,audit]``). Standard library only: it
runs inside the build stage, whose Python has no third-party packages.

    python3 deploy/requirements.py pyproject.toml worker,audit,deploy
"""

from __future__ import annotations

import re
import sys
import tomllib

SELF = re.compile(r"^actionfleet\[(?P<extras>[^\]]+)\]$")


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject has {sorted(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            m = SELF.match(req.replace(" ", ""))
            if m:
                todo.extend(m["extras"].split(","))
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    path, wanted = sys.argv[1], sys.argv[2]
    print("\n".join(requirements(path, [e for e in wanted.split(",") if e])))
