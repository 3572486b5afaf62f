"""Persistence of a document: snapshots in the state store, the update log in bus history.

Every accepted update is published to the document's bus room with ``history=True``: its history
offset orders it and the history is the document's log. A *snapshot* in the state store,
``{"snap": base64(update), "off": N, "epoch": E}``, holds the whole document up to (at least) the
update at offset ``N`` of history epoch ``E``. Loading a document reads the snapshot and the log
after ``N``; compaction writes a new snapshot with compare-and-set.

Compaction is safe against concurrent replicas: the new snapshot is the *merge* (pycrdt) of the
stored snapshot and this replica's document, and it covers the larger of the two offsets, so a
replica that loses the compare-and-set race re-reads the winner's snapshot and merges again.
Nothing either replica had is lost, whichever order they write in.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from dataclasses import dataclass
from typing import Any

import pycrdt

from wirehub import Backend, StateConflict

log = logging.getLogger("wirehub.yjs")


@dataclass(frozen=True)
class Snapshot:
    version: int  # the state store's version (0: none stored)
    update: bytes  # the document as one Yjs update (b"" when none)
    offset: int  # history offset it covers
    epoch: str | None  # history epoch of that offset


def parse_snapshot(found: tuple[int, Any] | None) -> Snapshot:
    if found is None:
        return Snapshot(0, b"", 0, None)
    version, stored = found
    if not isinstance(stored, dict) or not isinstance(stored.get("snap"), str):
        raise ValueError(f"the state store holds a document the yjs handler did not write: {stored!r:.80}")
    off = stored.get("off")
    epoch = stored.get("epoch")
    return Snapshot(version, base64.b64decode(stored["snap"]), off if isinstance(off, int) else 0,
                    epoch if isinstance(epoch, str) else None)


def merge(*updates: bytes) -> bytes:
    """One update holding all of ``updates`` (pycrdt does the CRDT merge, with garbage collection)."""
    doc: pycrdt.Doc[Any] = pycrdt.Doc()
    for update in updates:
        if update:
            doc.apply_update(update)
    return doc.get_update()


class DocumentStore:
    """Snapshots of one endpoint's documents in ``backend.state``."""

    def __init__(self, backend: Backend, max_retries: int) -> None:
        self.backend = backend
        self.max_retries = max_retries
        #: compare-and-set conflicts met by compactions (a metric reads it)
        self.conflicts = 0

    async def load(self, key: str) -> Snapshot:
        return parse_snapshot(await self.backend.state.get(key))

    async def compact(self, key: str, update: bytes, offset: int, epoch: str | None) -> Snapshot | None:
        """Store the merge of the stored snapshot and ``update`` (a whole document that holds every
        update up to ``offset`` of ``epoch``); returns the snapshot written, or None after
        ``max_retries`` lost races. Raises BusUnavailable."""
        for attempt in range(self.max_retries):
            stored = await self.load(key)
            if stored.epoch == epoch and stored.offset >= offset and stored.update == update:
                return stored  # nothing new
            merged = merge(stored.update, update)
            # the same epoch: the merge holds both prefixes of the log; another epoch: only ours counts
            covers = max(offset, stored.offset) if stored.epoch == epoch else offset
            document = {"snap": base64.b64encode(merged).decode("ascii"), "off": covers, "epoch": epoch,
                        "bytes": len(merged)}
            try:
                version = await self.backend.state.compare_and_set(key, stored.version, document)
            except StateConflict:
                self.conflicts += 1
                await asyncio.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** attempt)))
                continue
            return Snapshot(version, merged, covers, epoch)
        log.warning("%s: compaction lost %d compare-and-set races in a row; retried later", key, self.max_retries)
        return None
