"""The accuracy matrix R and per-experience records, persisted under `<state>/metrics/`.

R[i][j] = kNN accuracy on probe set j after experience i (0-based rows here; experience
numbers are 1-based in names and labels). The copy in each checkpoint is the truth;
`metrics/` is rewritten from it after every checkpoint so readers (report, dashboards)
never see a row the model state does not have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from learners.forgetting import average_accuracy, average_forgetting, backward_transfer
from replay.atomic import write_atomic


@dataclass
class History:
    """Evaluation results so far."""

    experiences: list[int] = field(default_factory=list)  # experience number of each row of R
    accuracy: list[list[float | None]] = field(default_factory=list)  # R, row per finished experience
    cka: list[list[float | None]] = field(default_factory=list)
    probe_loss: list[list[float | None]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # one per finished experience: domain, images/s, time…

    def add_row(self, experience: int, accuracy: list[float | None], cka: list[float | None],
                probe_loss: list[float | None], record: dict) -> None:
        self.experiences.append(experience)
        self.accuracy.append(accuracy)
        self.cka.append(cka)
        self.probe_loss.append(probe_loss)
        self.records.append({"experience": experience, **record, **self.summary()})

    def summary(self) -> dict[str, float | None]:
        """ACC, BWT and average forgetting of the matrix so far."""
        if not self.accuracy:
            return {"acc": None, "bwt": None, "avg_forgetting": None}
        return {"acc": average_accuracy(self.accuracy), "bwt": backward_transfer(self.accuracy),
                "avg_forgetting": average_forgetting(self.accuracy)}

    def to_json(self) -> dict:
        return {"experiences": self.experiences, "accuracy": self.accuracy, "cka": self.cka,
                "probe_loss": self.probe_loss, "records": self.records}

    @classmethod
    def from_json(cls, data: dict) -> History:
        return cls(**data)

    def export(self, folder: Path, throughput: list[dict]) -> None:
        """Rewrite `metrics/accuracy_matrix.json` and `metrics/history.json` atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "accuracy_matrix.json", json.dumps(
            {"experiences": self.experiences, "R": self.accuracy, **self.summary()}, indent=2).encode())
        write_atomic(folder / "history.json", json.dumps(
            {**self.to_json(), "throughput": throughput}, indent=2).encode())
