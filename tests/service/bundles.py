"""A second bundle for the reload tests, made cheaply: the default bundle's bytes with its
``hopgate.model_version`` changed in place (same length, so the protobuf stays valid)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hopgate.bundle import load_meta


def relabelled(src: Path, dst: Path, last: str = "X") -> str:
    """Write ``src`` to ``dst`` (atomically: a rename) with the model version's last
    character replaced by ``last``; returns the new version."""
    old = load_meta(src).model_version
    new = old[:-1] + last
    data = Path(src).read_bytes()
    key = json.dumps(old).encode()
    assert data.count(key) == 1 and old != new
    tmp = Path(dst).with_suffix(".tmp")
    tmp.write_bytes(data.replace(key, json.dumps(new).encode()))
    os.replace(tmp, dst)
    assert load_meta(dst).model_version == new
    return new
