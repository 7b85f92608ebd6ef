"""Where training stands: experience, counts and stream positions (saved in every checkpoint)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Progress:
    """Training progress; `experience` is the one in progress (1-based)."""

    experience: int = 1
    images_in_experience: int = 0
    images_total: int = 0
    steps: int = 0
    steps_skipped: int = 0
    domain: str | None = None
    positions: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    first_offsets: dict[int, int] = field(default_factory=dict)  # partition -> first offset of this experience
    started_at: float | None = None  # unix time this experience began

    def to_json(self) -> dict:
        data = asdict(self)
        data["positions"] = {str(p): o for p, o in self.positions.items()}
        data["first_offsets"] = {str(p): o for p, o in self.first_offsets.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> Progress:
        data = dict(data)
        data["positions"] = {int(p): int(o) for p, o in data.get("positions", {}).items()}
        data["first_offsets"] = {int(p): int(o) for p, o in data.get("first_offsets", {}).items()}
        return cls(**data)


def write_offsets(path: Path, topic: str, positions: dict[int, int]) -> None:
    """`offsets.json`: the stream position this checkpoint's model state corresponds to."""
    path.write_text(json.dumps({"topic": topic, "positions": {str(p): o for p, o in sorted(positions.items())}},
                               indent=2))


def read_offsets(path: Path) -> dict[int, int]:
    return {int(p): int(o) for p, o in json.loads(path.read_text())["positions"].items()}
