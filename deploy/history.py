"""The accuracy matrix R and per-experience records, persisted under `<state>/metrics/`.

R[i][j] = kNN accuracy on probe set j after experience i (0-based rows here; experience
numbers are 1-based in names and labels); `linear` is the same matrix for the linear
probe, and `baselines[j]` holds probe set j's floors (raw pixels, untrained encoder) scored
when it was created (protocol: docs/continual.md). The copy in each checkpoint is the truth;
`metrics/` is rewritten after every checkpoint and whenever the evaluator's rows arrive (a row
not yet in a checkpoint is in its `pending_evaluations`, so it comes back after a crash): readers
(report, dashboards) never see a row the model state does not have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from learners.forgetting import average_accuracy, average_forgetting, backward_transfer
from learners.protocol import KNN_K, KNN_TEMPERATURE, LINEAR_FOLDS, MIN_CLASS_IMAGES
from safefiles.files import write_atomic

if TYPE_CHECKING:  # an annotation only: `tailord report` reads histories without loading the learner
    from deploy.evaluate import EvalRow

PROTOCOL = {"knn": f"leave-one-out weighted kNN, k <= {KNN_K} (capped per probe set), T={KNN_TEMPERATURE}",
            "linear": f"logistic regression on standardised frozen features, stratified {LINEAR_FOLDS}-fold CV",
            "min_class_images": MIN_CLASS_IMAGES}


@dataclass
class History:
    """Evaluation results so far."""

    experiences: list[int] = field(default_factory=list)  # experience number of each row of R
    accuracy: list[list[float | None]] = field(default_factory=list)  # R, row per finished experience
    linear: list[list[float | None]] = field(default_factory=list)  # linear-probe R
    baselines: dict[str, dict] = field(default_factory=dict)  # str(experience) -> its probe set's floors
    cka: list[list[float | None]] = field(default_factory=list)
    probe_loss: list[list[float | None]] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # one per finished experience: domain, images/s, time…

    def add_row(self, experience: int, row: EvalRow, baselines: dict, record: dict) -> None:
        """Append experience `experience`'s row and its new probe set's floors."""
        self.experiences.append(experience)
        self.accuracy.append(row.accuracy)
        self.linear.append(row.linear)
        self.cka.append(row.cka)
        self.probe_loss.append(row.probe_loss)
        self.baselines[str(experience)] = baselines
        self.records.append({"experience": experience, **record, **self.summary()})

    def summary(self) -> dict[str, float | None]:
        """ACC, BWT and average forgetting of the matrix so far."""
        if not self.accuracy:
            return {"acc": None, "bwt": None, "avg_forgetting": None, "acc_linear": None}
        return {"acc": average_accuracy(self.accuracy), "bwt": backward_transfer(self.accuracy),
                "avg_forgetting": average_forgetting(self.accuracy),
                "acc_linear": average_accuracy(self.linear) if self.linear else None}

    def to_json(self) -> dict:
        return {"experiences": self.experiences, "accuracy": self.accuracy, "linear": self.linear,
                "baselines": self.baselines, "cka": self.cka, "probe_loss": self.probe_loss,
                "records": self.records}

    @classmethod
    def from_json(cls, data: dict) -> History:
        """Also reads histories written before `linear` and `baselines` existed."""
        data = {"linear": [[None] * len(row) for row in data["accuracy"]], **data}
        return cls(**data)

    def export(self, folder: Path, throughput: list[dict]) -> None:
        """Rewrite `metrics/accuracy_matrix.json` and `metrics/history.json` atomically."""
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "accuracy_matrix.json", json.dumps(
            {"experiences": self.experiences, "R": self.accuracy, "R_linear": self.linear,
             "baselines": self.baselines, "protocol": PROTOCOL, **self.summary()}, indent=2).encode())
        write_atomic(folder / "history.json", json.dumps(
            {**self.to_json(), "throughput": throughput}, indent=2).encode())
