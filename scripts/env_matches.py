"""Exit 0 when this interpreter's environment already has what pyproject.toml asks for (the
project installed with its console script, every dependency and those of the named extras at an
allowed version); 1 otherwise. scripts/bootstrap asks it before running pip, so a complete
.venv starts without a package index.   usage: python scripts/env_matches.py [EXTRA[,EXTRA]]"""

from __future__ import annotations

import importlib.metadata as metadata
import shutil
import sys
from pathlib import Path


def missing(extras: list[str]) -> list[str]:
    try:
        import tomllib
        from packaging.requirements import Requirement
    except ImportError as exc:  # Python 3.10 without tomli, or no packaging: let pip decide
        return [f"cannot check ({exc})"]
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += project.get("optional-dependencies", {}).get(extra, [])
    problems = []
    try:
        installed = metadata.distribution(project["name"])
        if installed.version != project["version"]:
            problems.append(f"{project['name']} {installed.version} (want {project['version']})")
    except metadata.PackageNotFoundError:
        problems.append(project["name"])
    for name in project.get("scripts", {}):
        if shutil.which(name, path=str(Path(sys.executable).parent)) is None:
            problems.append(f"the {name} command")
    for text in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(text)
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{text} (have {version})")
    return problems


if __name__ == "__main__":
    extras = [e for e in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if e]
    problems = missing(extras)
    if problems:
        print("bootstrap: to install: " + ", ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""), file=sys.stderr)
    sys.exit(1 if problems else 0)
