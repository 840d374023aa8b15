"""Exit 0 when this interpreter's environment already has what pyproject.toml asks for (the
project installed with its console script, every dependency and those of the named extras at an
allowed version, and every installed package that requirements/lock.txt pins at its locked
version); 1 otherwise. scripts/bootstrap asks it before running pip, so a complete
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
    return problems + off_lock()


def off_lock() -> list[str]:
    """Installed packages whose version is not the one requirements/lock.txt pins (markers applied)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    lock = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"
    if not lock.exists():
        return ["requirements/lock.txt (missing)"]
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    problems = []
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            return [f"cannot read the lock line {line!r}"]
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = installed.get(canonicalize_name(req.name))
        if have is not None and not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req.name}{req.specifier} (have {have})")
    return problems


if __name__ == "__main__":
    extras = [e for e in (sys.argv[1] if len(sys.argv) > 1 else "").split(",") if e]
    problems = missing(extras)
    if problems:
        print(
            "bootstrap: to install: " + ", ".join(problems[:8]) + (" ..." if len(problems) > 8 else ""), file=sys.stderr
        )
    sys.exit(1 if problems else 0)
