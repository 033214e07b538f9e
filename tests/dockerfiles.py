"""What an image built from ``docker/Dockerfile`` runs, read from the file (no Docker engine).

``image(target)`` follows the target's ``FROM <stage>`` chain and returns its ENTRYPOINT, CMD,
ENV (the parents' first), WORKDIR, USER and HEALTHCHECK command; the tests of the deployment
files and the compose topology played as processes read images through it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def stages(path: Path = DOCKERFILE) -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (what it is built FROM, its instructions as joined lines)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found: dict[str, tuple[str, list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM (\S+)(?: AS (\S+))?$", line, re.I)
        if match:
            current = []
            found[match.group(2) or f"stage{len(found)}"] = (match.group(1), current)
        elif current is not None:
            current.append(line)
    return found


def image(target: str, path: Path = DOCKERFILE) -> dict[str, Any]:
    """ENTRYPOINT, CMD, ENV, WORKDIR, USER and the HEALTHCHECK command of ``target``."""
    all_stages = stages(path)
    chain: list[str] = []
    name = target
    while name in all_stages:
        chain.insert(0, name)
        name = all_stages[name][0]
    if not chain:
        raise KeyError(f"no stage {target!r} in {path}")
    result: dict[str, Any] = {"env": {}, "entrypoint": [], "cmd": [], "workdir": "/",
                              "user": "root", "stages": chain}  # fmt: skip
    for stage in chain:
        for line in all_stages[stage][1]:
            word, _, rest = line.partition(" ")
            word = word.upper()
            if word == "ENV":
                result["env"].update(part.split("=", 1) for part in shlex.split(rest))
            elif word in ("ENTRYPOINT", "CMD"):
                result[word.lower()] = json.loads(rest)
            elif word == "WORKDIR":
                result["workdir"] = rest.strip()
            elif word == "USER":
                result["user"] = rest.strip()
            elif word == "HEALTHCHECK":
                result["healthcheck"] = json.loads(rest.split(" CMD ", 1)[1])
    return result
