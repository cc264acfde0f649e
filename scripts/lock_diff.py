"""Which installed packages differ from the lock: `python scripts/lock_diff.py [requirements.lock]`.

The weekly canary installs the newest versions pyproject.toml's ranges allow; when its tests fail, this
names what it installed that the lock does not pin (a newer release, or a package the lock lacks), so the
breaking release can be excluded in pyproject.toml. Prints one line per difference; exits 0.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;([^\\]*))?")


def locked_versions(lock_text: str) -> dict[str, str]:
    """{package: version} pinned by a hashed requirements lock for this interpreter (markers evaluated here)."""
    pins = {}
    for line in lock_text.splitlines():
        if match := PIN.match(line):
            name, version, marker = match.groups()
            if marker is None or Marker(marker.strip()).evaluate():
                pins[canonicalize_name(name)] = version
    return pins


def installed_versions() -> dict[str, str]:
    return {canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def differences(locked: dict[str, str], installed: dict[str, str], ignore: set[str] = frozenset()) -> list[str]:
    """`name: locked X, installed Y` for each package whose version differs, or that only one side has."""
    lines = []
    for name in sorted(set(locked) | set(installed)):
        if name in ignore or locked.get(name) == installed.get(name):
            continue
        pinned, present = locked.get(name, "(not in the lock)"), installed.get(name, "(not installed)")
        lines.append(f"{name}: locked {pinned}, installed {present}")
    return lines


def main(argv: list[str]) -> None:
    lock = Path(argv[0] if argv else Path(__file__).resolve().parent.parent / "requirements.lock")
    # The project itself and the installers are not part of the lock.
    found = differences(locked_versions(lock.read_text()), installed_versions(), {"dycoke-eval", "pip", "uv"})
    print("\n".join(found) if found else f"every installed package is as {lock.name} pins it")


if __name__ == "__main__":
    main(sys.argv[1:])
