"""The payloads of the synchronization frames, typed: one dataclass and one encode/decode pair each.

Both sides speak these: the device (``pushsync.listener.sync``) sends SYNC_BEGIN
and UPLOAD and reads the rest, the dispatcher (``pushsync.dispatcher.sync_endpoint``)
the other way round. Each decoder checks the shape of what it reads and raises
:class:`~pushsync.wire.protocol.Malformed` with a sentence naming the field; the
meaning (is the table published, may the device upload this) is for the server.
The JSON of each frame is :func:`~pushsync.wire.protocol.encode_json_frame`'s;
the frames and their fields are in ``docs/sync.md``.

Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from pushsync.wire.protocol import (
    Frame,
    FrameType,
    Malformed,
    decode_json_frame,
    encode_json_frame,
)

Op = Literal["insert", "update", "delete"]
"""What a change did."""

OPS: Final[tuple[Op, ...]] = ("insert", "update", "delete")

MAX_NAME: Final = 200
"""Characters a publication, batch or table name may have."""
MAX_IMAGE_COLUMNS: Final = 1_600
"""Columns one row image (key, old, new) may name: PostgreSQL's limit for a table."""

Row = dict[str, Any]
"""A row image: column names to values as JSON has them (numbers with a fraction as text)."""


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True, slots=True)
class TableShape:
    """The columns (name, PostgreSQL type) and the key of a table, as both sides describe it."""

    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]

    @property
    def column_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.columns)

    def to_json(self) -> dict[str, Any]:
        return {"columns": [list(c) for c in self.columns], "key": list(self.key)}


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a row: what the device captured, what an UPLOAD frame carries."""

    seq: int
    table: str
    """Server name, e.g. ``public.routes``."""
    op: Op
    key: Row
    """The key column values; for an update, the key before it."""
    old: Row | None
    """The whole row before (update, delete); ``None`` for an insert."""
    new: Row | None
    """The whole row after (insert, update); ``None`` for a delete."""

    @property
    def values(self) -> int:
        """How many values its images hold."""
        return sum(len(image) for image in (self.key, self.old, self.new) if image is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "table": self.table,
            "op": self.op,
            "key": self.key,
            "old": self.old,
            "new": self.new,
        }


# --------------------------------------------------------------------------- the frames


@dataclass(frozen=True, slots=True)
class SyncBegin:
    """Device → server: a synchronization starts."""

    publication: str | None
    """``None``: the only publication granted to the device."""
    watermark: str | None
    """The snapshot of the last synchronization; ``None`` before the first."""
    tables: Mapping[str, TableShape] = field(default_factory=dict)
    """The shape of each local table, by server name."""


@dataclass(frozen=True, slots=True)
class Upload:
    """Device → server: one frame of an upload batch."""

    batch: str
    rows: Sequence[Change]
    more: bool
    """Whether more frames of the same batch follow."""
    follows: bool | None = None
    """Whether more batches of the same upload follow (sent with the batch's frames);
    ``None``: not said (a device that does not say it), each batch stands alone. A
    publication with ``upload: atomic`` holds the batches until the one that says
    ``False`` and applies them together."""


@dataclass(frozen=True, slots=True)
class Uploaded:
    """Server → device: what became of every change of a batch."""

    batch: str
    applied: Sequence[int]
    rejected: Mapping[int, str]
    """The seq of each refused change, with the reason."""
    held: bool = False
    """The batch is held, not applied: the answer to the upload's last batch covers it."""
    refused: str | None = None
    """Why the whole upload was refused (``upload: atomic``): nothing of it was applied
    and the device keeps every row of it to upload again."""


@dataclass(frozen=True, slots=True)
class Download:
    """Server → device: rows of one table (a table may take several frames)."""

    table: str
    schema: TableShape
    full: bool
    """Whether the table is sent in full: afterwards the device holds exactly these rows."""
    upserts: Sequence[Row]
    deletes: Sequence[Row]
    """Keys of rows to remove."""
    more: bool
    """Whether more frames of this table follow."""


@dataclass(frozen=True, slots=True)
class SyncEnd:
    """Server → device: the download is complete; the new watermark."""

    publication: str
    watermark: str


# --------------------------------------------------------------------------- encoders


def encode_sync_begin(begin: SyncBegin) -> bytes:
    payload: dict[str, Any] = {
        "watermark": begin.watermark,
        "tables": {name: shape.to_json() for name, shape in begin.tables.items()},
    }
    if begin.publication is not None:
        payload["publication"] = begin.publication
    return encode_json_frame(FrameType.SYNC_BEGIN, payload)


def encode_upload(upload: Upload) -> bytes:
    rows = [change.to_json() for change in upload.rows]
    payload: dict[str, Any] = {"batch": upload.batch, "rows": rows, "more": upload.more}
    if upload.follows is not None:
        payload["follows"] = upload.follows
    return encode_json_frame(FrameType.UPLOAD, payload)


def uploaded_json(uploaded: Uploaded) -> dict[str, Any]:
    """The UPLOADED payload as JSON has it (seqs of the rejected as text: JSON's keys);
    ``held`` and ``refused`` only when set."""
    payload: dict[str, Any] = {
        "batch": uploaded.batch,
        "applied": list(uploaded.applied),
        "rejected": {str(seq): reason for seq, reason in uploaded.rejected.items()},
    }
    if uploaded.held:
        payload["held"] = True
    if uploaded.refused is not None:
        payload["refused"] = uploaded.refused
    return payload


def encode_uploaded(uploaded: Uploaded) -> bytes:
    return encode_json_frame(FrameType.UPLOADED, uploaded_json(uploaded))


def encode_download(download: Download) -> bytes:
    payload = {
        "table": download.table,
        "schema": download.schema.to_json(),
        "full": download.full,
        "upserts": list(download.upserts),
        "deletes": list(download.deletes),
        "more": download.more,
    }
    return encode_json_frame(FrameType.DOWNLOAD, payload)


def encode_sync_end(end: SyncEnd) -> bytes:
    payload = {"publication": end.publication, "watermark": end.watermark}
    return encode_json_frame(FrameType.SYNC_END, payload)


def encode_sync_error(error: str) -> bytes:
    return encode_json_frame(FrameType.SYNC_ERROR, {"error": error})


# --------------------------------------------------------------------------- decoders


def decode_sync_begin(frame: Frame) -> SyncBegin:
    payload = decode_json_frame(frame, FrameType.SYNC_BEGIN)
    named = payload.get("publication")
    publication = None if named is None else _name(named, "publication")
    watermark = payload.get("watermark")
    if watermark is not None and not isinstance(watermark, str):
        raise Malformed("watermark must be text")
    tables = payload.get("tables") or {}
    if not isinstance(tables, dict):
        raise Malformed("tables must be an object")
    shapes = {name: _shape(shape, f"tables: {name}") for name, shape in tables.items()}
    return SyncBegin(publication=publication, watermark=watermark, tables=shapes)


def decode_upload(frame: Frame, first: int = 0) -> Upload:
    """One UPLOAD frame; ``first`` is the index of its first row in the batch (for messages)."""
    payload = decode_json_frame(frame, FrameType.UPLOAD)
    batch = _name(payload.get("batch"), "batch")
    rows = payload.get("rows")
    if not isinstance(rows, list):
        raise Malformed("rows must be a list")
    changes = [decode_change(row, first + n) for n, row in enumerate(rows)]
    follows = payload.get("follows")
    if follows is not None and not isinstance(follows, bool):
        raise Malformed("follows must be true or false")
    return Upload(batch=batch, rows=changes, more=bool(payload.get("more")), follows=follows)


def decode_change(row: Any, index: int) -> Change:
    """Row ``index`` of an upload batch, checked for shape and size (not for meaning)."""
    if not isinstance(row, dict):
        raise Malformed(f"upload row {index} is not an object")
    seq = row.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise Malformed(f"upload row {index}: seq must be a whole number")
    table = _name(row.get("table"), f"upload row {index}: table")
    op = row.get("op")
    if op not in OPS:
        raise Malformed(f"upload row {index}: op must be insert, update or delete")
    images = {part: _image(row.get(part), f"upload row {index}: {part}") for part in _IMAGES}
    key = images["key"]
    if key is None:
        raise Malformed(f"upload row {index}: key is missing")
    return Change(
        seq=seq, table=table, op=cast(Op, op), key=key, old=images["old"], new=images["new"]
    )


def decode_uploaded(frame: Frame) -> Uploaded:
    payload = decode_json_frame(frame, FrameType.UPLOADED)
    batch = _text(payload.get("batch"), "UPLOADED batch must be text")
    applied = payload.get("applied")
    if not isinstance(applied, list) or not all(_whole(seq) for seq in applied):
        raise Malformed("UPLOADED applied must be a list of whole numbers")
    held = payload.get("held", False)
    if not isinstance(held, bool):
        raise Malformed("UPLOADED held must be true or false")
    refused = payload.get("refused")
    if refused is not None:
        refused = _text(refused, "UPLOADED refused must be text")
    return Uploaded(
        batch=batch,
        applied=applied,
        rejected=_reasons(payload.get("rejected")),
        held=held,
        refused=refused,
    )


def decode_download(frame: Frame) -> Download:
    payload = decode_json_frame(frame, FrameType.DOWNLOAD)
    table = _text(payload.get("table"), "DOWNLOAD without a table")
    parts = {
        part: _objects(payload.get(part, []), f"DOWNLOAD of {table}: {part}") for part in _ROWS
    }
    return Download(
        table=table,
        schema=_shape(payload.get("schema"), f"DOWNLOAD of {table}: schema"),
        full=bool(payload.get("full")),
        upserts=parts["upserts"],
        deletes=parts["deletes"],
        more=bool(payload.get("more")),
    )


def decode_sync_end(frame: Frame) -> SyncEnd:
    payload = decode_json_frame(frame, FrameType.SYNC_END)
    watermark = _text(payload.get("watermark"), "SYNC_END without a watermark")
    publication = _text(payload.get("publication"), "SYNC_END without a publication")
    return SyncEnd(publication=publication, watermark=watermark)


def decode_sync_error(frame: Frame) -> str:
    """The server's sentence; log it as untrusted text."""
    error = decode_json_frame(frame, FrameType.SYNC_ERROR).get("error")
    return _text(error, "SYNC_ERROR error must be text")


# --------------------------------------------------------------------------- fields

_IMAGES: Final = ("key", "old", "new")
_ROWS: Final = ("upserts", "deletes")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise Malformed(f"{what} must be non-empty text")
    return value


def _text(value: Any, refusal: str) -> str:
    if not isinstance(value, str):
        raise Malformed(refusal)
    return value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image(value: Any, what: str) -> Row | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Malformed(f"{what} must be an object")
    if len(value) > MAX_IMAGE_COLUMNS:
        raise Malformed(
            f"{what} names {len(value)} columns; a table has at most {MAX_IMAGE_COLUMNS}"
        )
    return value


def _shape(value: Any, what: str) -> TableShape:
    bad = Malformed(f"{what} must be {{columns: [[name, type], …], key: [name, …]}}")
    if not isinstance(value, dict):
        raise bad
    columns, key = value.get("columns"), value.get("key")
    if not isinstance(columns, list) or not isinstance(key, list):
        raise bad
    if not all(isinstance(c, list) and len(c) == 2 and _texts(c) for c in columns):
        raise bad
    if not _texts(key):
        raise bad
    return TableShape(columns=tuple((n, t) for n, t in columns), key=tuple(key))


def _texts(values: list[Any]) -> bool:
    return all(isinstance(v, str) for v in values)


def _objects(value: Any, what: str) -> list[Row]:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise Malformed(f"{what} must be objects")
    return value


def _reasons(value: Any) -> dict[int, str]:
    bad = Malformed("UPLOADED rejected must map each refused seq to its reason")
    if not isinstance(value, dict) or not _texts(list(value.values())):
        raise bad
    try:
        return {int(seq): reason for seq, reason in value.items()}
    except ValueError:
        raise bad from None


__all__ = [
    "MAX_IMAGE_COLUMNS",
    "OPS",
    "Change",
    "Download",
    "Op",
    "Row",
    "SyncBegin",
    "SyncEnd",
    "TableShape",
    "Upload",
    "Uploaded",
    "decode_change",
    "decode_download",
    "decode_sync_begin",
    "decode_sync_end",
    "decode_sync_error",
    "decode_upload",
    "decode_uploaded",
    "encode_download",
    "encode_sync_begin",
    "encode_sync_end",
    "encode_sync_error",
    "encode_upload",
    "encode_uploaded",
]
