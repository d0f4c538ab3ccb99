"""The progress record of a resumable shard-writing job: the one record every job that writes
shards keeps (``sharding.synth``, ``sharding.pack``, ``sharding.pack_parsing``,
``sharding.fill_masks``), so an interrupted job run again with the same settings keeps what it
published and writes the rest.

The record is ``shard-progress.json`` under the output root: the job's settings fingerprint and,
per published shard (by file name), its :class:`~dfmvr.data.writer.ShardInfo` (size and sha256,
those of its evaluation companion too) and what the job keeps beside it (the face model that made
it, the keys packed without masks, the input shard it came from). A recorded shard is kept only
while its bytes (and its companion's) are still what was recorded; a record of other settings,
or one that cannot be read, keeps nothing. Shards are written whole by
:class:`~dfmvr.data.writer.ShardWriter` and published before they are recorded, so a shard is
either recorded and intact or written again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from dfmvr.data import storage
from dfmvr.data.writer import ShardInfo

_logger = logging.getLogger(__name__)

PROGRESS_NAME = "shard-progress.json"
"""The progress record under a job's output root."""


@dataclass(kw_only=True, slots=True)
class Recorded:
    """A published shard as the record holds it."""

    info: ShardInfo
    extra: dict[str, Any] = field(default_factory=dict)
    """What the job keeps beside the shard (JSON)."""


class ShardProgress:
    """The progress record of the job writing ``root`` with settings ``fingerprint``.

    :meth:`load` reads what an earlier run with the same settings published and is still
    intact; :meth:`record` adds a published shard and writes the record at once.
    """

    def __init__(self, root: str, fingerprint: str, *, endpoint: str | None = None) -> None:
        self.fingerprint = fingerprint
        self.endpoint = endpoint
        self.url = storage.join(root, PROGRESS_NAME)
        self.shards: dict[str, Recorded] = {}

    def load(self) -> dict[str, Recorded]:
        """The intact shards of an earlier run with these settings, by file name (also kept as
        :attr:`shards`); nothing when there is no record, or one of other settings."""
        self.shards = {}
        try:
            doc = json.loads(storage.read_bytes(self.url, endpoint=self.endpoint))
        except FileNotFoundError:
            return {}
        except ValueError as exn:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            _logger.warning("%s: unreadable (%s); writing every shard again", self.url, exn)
            return {}
        if not isinstance(doc, dict) or doc.get("fingerprint") != self.fingerprint:
            _logger.warning("%s: left by a run with other settings; writing every shard again", self.url)
            return {}
        for name, rec in (doc.get("shards") or {}).items():
            try:
                recorded = Recorded(info=ShardInfo(**rec["info"]), extra=dict(rec.get("extra", {})))
            except (KeyError, TypeError, ValueError):
                _logger.warning("%s: the record of %s is malformed; writing it again", self.url, name)
                continue
            if self._intact(recorded.info):
                self.shards[name] = recorded
            else:
                _logger.warning("%s: missing or changed since it was recorded; writing it again", recorded.info.url)
        return dict(self.shards)

    def record(self, info: ShardInfo, **extra: Any) -> None:
        """Add the published shard ``info`` (with the job's ``extra``) and write the record."""
        self.shards[storage.basename(info.url)] = Recorded(info=info, extra=extra)
        self.save()

    def forget(self, name: str) -> None:
        """Drop a recorded shard (the job will write it again); the record is written on the next save."""
        self.shards.pop(name, None)

    def save(self) -> None:
        doc = {"fingerprint": self.fingerprint,
               "shards": {name: {"info": asdict(r.info), "extra": r.extra} for name, r in sorted(self.shards.items())}}
        storage.write_bytes(self.url, json.dumps(doc, indent=1).encode(), endpoint=self.endpoint)

    def _intact(self, info: ShardInfo) -> bool:
        try:
            return all(storage.sha256_and_size(url, endpoint=self.endpoint) == (sha256, size)
                       for url, size, sha256 in info.files())
        except (FileNotFoundError, storage.StorageError):
            return False


__all__ = ["PROGRESS_NAME", "Recorded", "ShardProgress"]
