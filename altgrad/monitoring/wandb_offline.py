"""Read a local W&B run folder (``wandb/offline-run-*`` or ``wandb/run-*``) without the W&B servers.

wandb 0.31 has no public reader for its transaction log, so this decodes it with wandb's own protobuf
definitions. The ``.wandb`` file is a LevelDB-style log: a 7-byte header ``<4sHB>`` = (b":W&B", 0xBEE1,
version), then 32 KiB blocks of chunks ``<IHB>`` = (crc32c, length, type) + payload, type FULL=1,
FIRST=2, MIDDLE=3, LAST=4; a block tail shorter than a chunk header is padding. Payloads are serialized
``wandb.proto.wandb_internal_pb2.Record`` messages.

Example:
    >>> run = read_offline_run("out/wandb/offline-run-20261121_120000-abc123")   # doctest: +SKIP
    >>> run.history[-1]["train/loss"], [a["title"] for a in run.alerts]           # doctest: +SKIP
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = ["OfflineRun", "iter_records", "read_offline_run", "find_run_dirs"]

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768


@dataclass
class OfflineRun:
    """What a local W&B run recorded: history rows, config, summary and alerts (raw W&B keys)."""

    path: Path
    run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield every ``Record`` of a ``.wandb`` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = _HEADER.unpack_from(data, 0)
    if (ident, magic) != (b":W&B", 0xBEE1):
        raise ValueError(f"{path} is not a W&B transaction log (header {ident!r}, {magic:#x})")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # block tail padding
            pos += left
            continue
        _crc, length, kind = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size
        if kind == 0:  # zero-filled (preallocated) remainder
            break
        chunk, pos = data[pos : pos + length], pos + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Decode a run folder's ``.wandb`` log (plus ``files/wandb-summary.json`` where present)."""
    run_dir = Path(run_dir)
    run = OfflineRun(path=run_dir)
    for log in sorted(run_dir.glob("*.wandb"))[:1]:
        for record in iter_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id = record.run.run_id or run.run_id
            elif kind == "history":
                run.history.append({_key(i): _value(i.value_json) for i in record.history.item})
            elif kind == "config":
                run.config.update({_key(i): _value(i.value_json) for i in record.config.update})
            elif kind == "summary":
                run.summary.update({_key(i): _value(i.value_json) for i in record.summary.update})
            elif kind == "alert":
                a = record.alert
                run.alerts.append({"title": a.title, "text": a.text, "level": a.level, "wait_duration": a.wait_duration})
            elif kind == "exit":
                run.finished = True
    summary_file = run_dir / "files" / "wandb-summary.json"
    if summary_file.is_file():
        run.summary.update(json.loads(summary_file.read_text()))
    return run


def find_run_dirs(root: str | Path) -> list[Path]:
    """Local W&B run folders under ``root`` (or ``root/wandb``), oldest first."""
    root = Path(root)
    if root.name.startswith(("offline-run-", "run-")):
        return [root]
    found = sorted(root.glob("wandb/offline-run-*")) + sorted(root.glob("wandb/run-*"))
    found += sorted(root.glob("offline-run-*")) + sorted(root.glob("run-*"))
    return [d for d in found if d.is_dir() and (list(d.glob("*.wandb")) or (d / "files" / "wandb-summary.json").is_file())]
