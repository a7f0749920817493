"""Expert uids: ``<modality>.<layer>.<index>``, e.g. ``text.1.3`` is the 4th text expert of the 2nd block."""
from __future__ import annotations

import re
from typing import NamedTuple

UID_PATTERN = re.compile(r"^(text|image|audio)\.(\d{1,3})\.(\d{1,4})$")


class ExpertUid(NamedTuple):
    modality: str
    layer: int
    index: int

    def __str__(self) -> str:
        return make_uid(self.modality, self.layer, self.index)


def make_uid(modality: str, layer: int, index: int) -> str:
    """Build the uid of expert ``index`` of ``modality`` in block ``layer``."""
    uid = f"{modality}.{int(layer)}.{int(index)}"
    if not UID_PATTERN.match(uid):
        raise ValueError(f"invalid expert uid parts: modality={modality!r} layer={layer!r} index={index!r}")
    return uid


def parse_uid(uid: str) -> ExpertUid:
    """Split a uid into (modality, layer, index); raise ValueError naming a malformed uid."""
    match = UID_PATTERN.match(uid) if isinstance(uid, str) else None
    if match is None:
        raise ValueError(f"malformed expert uid {uid!r}: expected <text|image|audio>.<layer>.<index>")
    return ExpertUid(match.group(1), int(match.group(2)), int(match.group(3)))
