"""Label vocabularies: one per task, built on the train split, saved with every run.

Classes seen fewer than ``min_count`` times in train fold into ``"Other"``, so rare
labels neither get a useless head unit nor crash evaluation. At inference, a label the
vocabulary never saw maps to ``"Other"`` when the task has one, else to ``-1``
(reported as unknown and ignored by loss and metrics).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

OTHER = "Other"
UNKNOWN_INDEX = -1


@dataclass(frozen=True)
class TaskVocab:
    """Ordered class names of one task (most frequent first, ``Other`` last)."""

    task: str
    classes: tuple[str, ...]
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"vocabulary for {self.task!r} has duplicate classes")
        object.__setattr__(self, "_lookup", {c: i for i, c in enumerate(self.classes)})

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def other_index(self) -> int:
        return self._lookup.get(OTHER, UNKNOWN_INDEX)

    def index(self, label: str) -> int:
        return self._lookup.get(label, self.other_index)

    def is_known(self, label: str) -> bool:
        return label in self._lookup

    @classmethod
    def build(cls, task: str, labels: Iterable[str], min_count: int = 1) -> TaskVocab:
        counts = pd.Series(list(labels), dtype="object").value_counts(sort=False)
        # frequency desc, then name: stable across pandas versions and runs
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        kept = [str(c) for c, n in ordered if n >= min_count and c != OTHER]
        folded = len(kept) < len(ordered)
        if folded or any(c == OTHER for c, _ in ordered):
            kept.append(OTHER)
        return cls(task, tuple(kept))


class LabelVocabs(Mapping[str, TaskVocab]):
    """The vocabularies of all trained tasks, in task (label-column) order."""

    def __init__(self, vocabs: Iterable[TaskVocab]) -> None:
        self._vocabs = {v.task: v for v in vocabs}

    def __getitem__(self, task: str) -> TaskVocab:
        return self._vocabs[task]

    def __iter__(self):
        return iter(self._vocabs)

    def __len__(self) -> int:
        return len(self._vocabs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelVocabs) and self.to_dict() == other.to_dict()

    @property
    def tasks(self) -> list[str]:
        return list(self._vocabs)

    @property
    def num_classes(self) -> dict[str, int]:
        return {t: len(v) for t, v in self._vocabs.items()}

    @classmethod
    def build(cls, frame: pd.DataFrame, tasks: Iterable[str], min_count: int = 1) -> LabelVocabs:
        missing = [t for t in tasks if t not in frame.columns]
        if missing:
            raise KeyError(f"catalog has no column(s) {missing}; columns are {list(frame.columns)}")
        return cls(TaskVocab.build(t, frame[t].astype(str), min_count) for t in tasks)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """Label indices ``[N, T]`` (int64); labels never seen -> Other or -1."""
        out = np.full((len(frame), len(self)), UNKNOWN_INDEX, dtype=np.int64)
        for col, (task, vocab) in enumerate(self._vocabs.items()):
            if task in frame.columns:
                out[:, col] = frame[task].astype(str).map(vocab.index).to_numpy(dtype=np.int64)
        return out

    def unseen_labels(self, frame: pd.DataFrame) -> dict[str, dict[str, int]]:
        """Per task, labels in ``frame`` that the vocabulary never saw, with counts."""
        report: dict[str, dict[str, int]] = {}
        for task, vocab in self._vocabs.items():
            if task not in frame.columns:
                continue
            values = frame[task].astype(str)
            unseen = values[~values.map(vocab.is_known)].value_counts()
            if len(unseen):
                report[task] = {str(k): int(v) for k, v in unseen.items()}
        return report

    def decode(self, task: str, index: int) -> str:
        return "<unknown>" if index == UNKNOWN_INDEX else self._vocabs[task].classes[index]

    def to_dict(self) -> dict[str, list[str]]:
        return {t: list(v.classes) for t, v in self._vocabs.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Iterable[str]]) -> LabelVocabs:
        return cls(TaskVocab(t, tuple(c)) for t, c in data.items())

    def save(self, path: str | Path) -> Path:
        from fashion_lightning.utils.atomic import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LabelVocabs:
        return cls.from_dict(json.loads(Path(path).read_text()))
