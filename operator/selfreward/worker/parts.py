"""Finished batches of a generate or judge shard, kept in the store as they are done, so
a re-created shard (a killed or preempted pod) resumes where it stopped.

Each batch ``b`` of a shard is one part file, written whole (an atomic rename on file://,
a single PUT on S3: a part either exists complete or not at all)::

    iter-<t>/<phase>/shard-00000-of-00002.parts/batch-000003.json
      {"batch": 3, "keys": [...], "items": [...], "generatedTokens": n, "truncatedPrompts": k}

``keys`` name the work items of the batch (prompt ids, or (prompt id, response) pairs):
on restart a part is used only when its keys are exactly the batch's keys as the shard
computes them now (same prompts, same batch size), so a part can neither be used twice
nor stand in for different work; if any part does not fit, every part is dropped and the
shard starts over. Batches keep their index, so their sampling seeds (derived from it)
are those of an uninterrupted run. The shard's data file is still written once, whole,
from the parts in batch order; the parts are deleted after it.
"""
from __future__ import annotations

import json
import re
from typing import Any

from ..storage import Store
from .common import log

_PART = re.compile(r"^batch-(\d{6})\.json$")


class BatchParts:
    def __init__(self, store: Store, shard_data: str, where: str):
        self.store = store
        self.rel = shard_data[: -len(".jsonl")] + ".parts" if shard_data.endswith(".jsonl") else shard_data + ".parts"
        self.where = where

    def _path(self, batch: int) -> str:
        return f"{self.rel}/batch-{batch:06d}.json"

    def load(self, batch_keys: list[list[Any]]) -> dict[int, dict]:
        """The finished parts that fit the batches as planned now, by batch index."""
        found: dict[int, dict] = {}
        for name in self.store.list(self.rel):
            m = _PART.match(name)
            if not m:
                continue
            b = int(m.group(1))
            try:
                part = json.loads(self.store.read_text(f"{self.rel}/{name}"))
                fits = (0 <= b < len(batch_keys) and isinstance(part, dict) and part.get("batch") == b
                        and _keys(part.get("keys")) == _keys(batch_keys[b])
                        and isinstance(part.get("items"), list) and len(part["items"]) == len(batch_keys[b]))
            except (ValueError, UnicodeDecodeError):
                fits = False
            if not fits:
                log(f"{self.where}: {self.store.url(self.rel)} holds batches of other work; starting the shard over")
                self.clear()
                return {}
            found[b] = part
        if found:
            log(f"{self.where}: {len(found)} of {len(batch_keys)} batches already done; resuming")
        return found

    def write(self, batch: int, keys: list[Any], items: list[Any], **figures: Any) -> dict:
        part = {"batch": batch, "keys": keys, "items": items, **figures}
        self.store.write_text(self._path(batch), json.dumps(part, ensure_ascii=False, separators=(",", ":")))
        return part

    def clear(self) -> None:
        self.store.delete(self.rel)


def _keys(keys: Any) -> Any:
    """Keys compared after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(keys))
