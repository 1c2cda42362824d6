"""``dataset.json``: what a committed stage's tables mean, as a typed record.

Every stage writes one beside its tables (the design guide's contract): which table it holds, the class
names (index = class id, 0 = background), the counts, the job and its resolved config. Stage-specific facts
(a seeds table's method, resolution and encoding; a masks table's threshold) sit in ``details``; the JSON
keeps them at the top level, as the contract has always shown them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ray_wsss.core import storage
from ray_wsss.core.errors import WsssError
from ray_wsss.core.storage import StorageOptions

FILE = "dataset.json"


@dataclasses.dataclass
class DatasetInfo:
    table: str | None                 # "samples", "seeds", "masks", ...; None for a stage without a table
    class_names: list[str]            # index = class id; 0 = background
    job: str
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return {**self.details, "table": self.table, "class_names": list(self.class_names),
                "num_classes": self.num_classes, "job": self.job, "config": self.config, "counts": self.counts}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = FILE) -> DatasetInfo:
        missing = [key for key in ("table", "class_names", "job") if key not in data]
        if missing:
            raise WsssError(f"{source}: not a ray-wsss dataset.json (missing {missing})")
        names = data["class_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not names:
            raise WsssError(f"{source}: class_names must be a non-empty list of names, got {names!r}")
        known = {"table", "class_names", "num_classes", "job", "config", "counts"}
        return cls(table=data["table"], class_names=names, job=data["job"], config=data.get("config") or {},
                   counts=data.get("counts") or {}, details={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, stage_uri: str, options: StorageOptions | None = None) -> DatasetInfo:
        uri = storage.join(stage_uri, FILE)
        return cls.from_json(storage.read_json(uri, options), uri)

    def with_counts(self, **counts: Any) -> DatasetInfo:
        return dataclasses.replace(self, counts={**self.counts, **counts})
