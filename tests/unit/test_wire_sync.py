"""The typed synchronization payloads: round trips, the bytes they make, and every refusal."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pushsync.wire import protocol
from pushsync.wire import sync as w
from pushsync.wire.protocol import Frame, FrameType, Malformed

ROUTES = w.TableShape(columns=(("route_id", "integer"), ("name", "text")), key=("route_id",))
CHANGE = w.Change(
    seq=7,
    table="public.routes",
    op="update",
    key={"route_id": 20},
    old={"route_id": 20, "name": "south"},
    new={"route_id": 20, "name": "north"},
)


def frame(data: bytes) -> Frame:
    [decoded] = protocol.FrameReader().feed(data)
    return decoded


def json_frame(frame_type: FrameType, payload: Any) -> Frame:
    return Frame(frame_type, json.dumps(payload).encode())


def payload(data: bytes) -> Any:
    return json.loads(frame(data).payload)


# --------------------------------------------------------------------------- round trips


def test_sync_begin_round_trips_in_the_devices_field_order() -> None:
    begin = w.SyncBegin(publication="driver", watermark="5:9:", tables={"public.routes": ROUTES})
    data = w.encode_sync_begin(begin)
    assert w.decode_sync_begin(frame(data)) == begin
    assert list(payload(data)) == ["watermark", "tables", "publication"]
    assert payload(data)["tables"] == {
        "public.routes": {
            "columns": [["route_id", "integer"], ["name", "text"]],
            "key": ["route_id"],
        }
    }
    anonymous = w.SyncBegin(publication=None, watermark=None)
    assert payload(w.encode_sync_begin(anonymous)) == {"watermark": None, "tables": {}}
    assert w.decode_sync_begin(frame(w.encode_sync_begin(anonymous))) == anonymous


def test_sync_begin_ignores_fields_it_does_not_know() -> None:
    begin = json_frame(FrameType.SYNC_BEGIN, {"publication": "p", "device_id": "truck-1"})
    assert w.decode_sync_begin(begin) == w.SyncBegin(publication="p", watermark=None)


def test_upload_round_trips_and_keeps_the_row_layout() -> None:
    insert = w.Change(seq=8, table="public.r", op="insert", key={"a": 1}, old=None, new={"a": 1})
    upload = w.Upload(batch="i:7-8", rows=[CHANGE, insert], more=True)
    data = w.encode_upload(upload)
    assert w.decode_upload(frame(data)) == upload
    assert list(payload(data)) == ["batch", "rows", "more"]
    assert payload(data)["rows"][1] == {
        "seq": 8,
        "table": "public.r",
        "op": "insert",
        "key": {"a": 1},
        "old": None,
        "new": {"a": 1},
    }
    assert CHANGE.values == 5
    assert insert.values == 2


def test_numbers_with_a_fraction_come_back_as_text() -> None:
    change = w.Change(seq=1, table="t.t", op="insert", key={"a": 1}, old=None, new={"x": 1.5})
    upload = w.decode_upload(frame(w.encode_upload(w.Upload("b", [change], more=False))))
    assert upload.rows[0].new == {"x": "1.5"}


def test_uploaded_round_trips_with_seqs_as_json_keys() -> None:
    uploaded = w.Uploaded(batch="b", applied=[1, 2], rejected={3: "no", 10: "never"})
    data = w.encode_uploaded(uploaded)
    assert w.decode_uploaded(frame(data)) == uploaded
    assert data == protocol.encode_json_frame(
        FrameType.UPLOADED,
        {"batch": "b", "applied": [1, 2], "rejected": {"3": "no", "10": "never"}},
    )


def test_an_upload_says_whether_batches_follow_only_when_it_knows() -> None:
    said = w.Upload(batch="b", rows=[CHANGE], more=False, follows=True)
    data = w.encode_upload(said)
    assert payload(data)["follows"] is True
    assert w.decode_upload(frame(data)) == said
    unsaid = w.Upload(batch="b", rows=[CHANGE], more=False)
    assert "follows" not in payload(w.encode_upload(unsaid))
    assert w.decode_upload(frame(w.encode_upload(unsaid))).follows is None


def test_held_and_refused_answers_round_trip_and_stay_out_of_plain_ones() -> None:
    held = w.Uploaded(batch="b", applied=[], rejected={}, held=True)
    refused = w.Uploaded(batch="b", applied=[], rejected={}, refused="row 3: no")
    for answer in (held, refused):
        assert w.decode_uploaded(frame(w.encode_uploaded(answer))) == answer
    assert payload(w.encode_uploaded(held))["held"] is True
    assert payload(w.encode_uploaded(refused))["refused"] == "row 3: no"
    plain = payload(w.encode_uploaded(w.Uploaded(batch="b", applied=[1], rejected={})))
    assert set(plain) == {"batch", "applied", "rejected"}


def test_download_and_sync_end_round_trip() -> None:
    download = w.Download(
        table="public.routes",
        schema=ROUTES,
        full=False,
        upserts=[{"route_id": 20, "name": "north"}],
        deletes=[{"route_id": 21}],
        more=True,
    )
    data = w.encode_download(download)
    assert w.decode_download(frame(data)) == download
    assert list(payload(data)) == ["table", "schema", "full", "upserts", "deletes", "more"]
    end = w.SyncEnd(publication="driver", watermark="5:9:")
    assert w.decode_sync_end(frame(w.encode_sync_end(end))) == end
    assert payload(w.encode_sync_end(end)) == {"publication": "driver", "watermark": "5:9:"}
    assert w.decode_sync_error(frame(w.encode_sync_error("busy"))) == "busy"


def test_a_download_without_rows_has_none() -> None:
    bare = json_frame(FrameType.DOWNLOAD, {"table": "t.t", "schema": ROUTES.to_json()})
    assert w.decode_download(bare) == w.Download(
        table="t.t", schema=ROUTES, full=False, upserts=[], deletes=[], more=False
    )


# --------------------------------------------------------------------------- refusals

SHAPE = "must be {columns: [[name, type], …], key: [name, …]}"

BAD_BEGINS = [
    ({"publication": ""}, "publication must be non-empty text"),
    ({"publication": "p" * 201}, "publication must be non-empty text"),
    ({"publication": 5}, "publication must be non-empty text"),
    ({"watermark": 5}, "watermark must be text"),
    ({"tables": [1]}, "tables must be an object"),
    ({"tables": {"t.t": 1}}, f"tables: t.t {SHAPE}"),
    ({"tables": {"t.t": {"columns": [["a"]], "key": []}}}, f"tables: t.t {SHAPE}"),
    ({"tables": {"t.t": {"columns": [], "key": [1]}}}, f"tables: t.t {SHAPE}"),
    ({"tables": {"t.t": {"columns": {}, "key": []}}}, f"tables: t.t {SHAPE}"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_BEGINS)
def test_a_malformed_sync_begin_is_refused_naming_the_field(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(Malformed) as refused:
        w.decode_sync_begin(json_frame(FrameType.SYNC_BEGIN, fields))
    assert str(refused.value) == message


ROW: dict[str, Any] = CHANGE.to_json()

BAD_UPLOADS = [
    ({"rows": []}, "batch must be non-empty text"),
    ({"batch": "b"}, "rows must be a list"),
    ({"batch": "b", "rows": {}}, "rows must be a list"),
    ({"batch": "b", "rows": [ROW, 5]}, "upload row 4 is not an object"),
    ({"batch": "b", "rows": [{**ROW, "seq": True}]}, "upload row 3: seq must be a whole number"),
    ({"batch": "b", "rows": [{**ROW, "seq": "1"}]}, "upload row 3: seq must be a whole number"),
    ({"batch": "b", "rows": [{**ROW, "table": ""}]}, "upload row 3: table must be non-empty text"),
    (
        {"batch": "b", "rows": [{**ROW, "op": "merge"}]},
        "upload row 3: op must be insert, update or delete",
    ),
    ({"batch": "b", "rows": [{**ROW, "old": [1]}]}, "upload row 3: old must be an object"),
    ({"batch": "b", "rows": [{**ROW, "key": None}]}, "upload row 3: key is missing"),
    (
        {"batch": "b", "rows": [{**ROW, "new": {str(n): n for n in range(1601)}}]},
        "upload row 3: new names 1601 columns; a table has at most 1600",
    ),
    ({"batch": "b", "rows": [], "follows": 1}, "follows must be true or false"),
    ({"batch": "b", "rows": [], "follows": "no"}, "follows must be true or false"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_UPLOADS)
def test_a_malformed_upload_is_refused_naming_the_row(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(Malformed) as refused:
        w.decode_upload(json_frame(FrameType.UPLOAD, fields), first=3)
    assert str(refused.value) == message


BAD_ANSWERS = [
    (
        FrameType.UPLOADED,
        {"batch": "b", "applied": [], "rejected": {}, "held": 1},
        "UPLOADED held must be true or false",
    ),
    (
        FrameType.UPLOADED,
        {"batch": "b", "applied": [], "rejected": {}, "refused": ["x"]},
        "UPLOADED refused must be text",
    ),
    (FrameType.UPLOADED, {"applied": [], "rejected": {}}, "UPLOADED batch must be text"),
    (
        FrameType.UPLOADED,
        {"batch": "b", "applied": [True], "rejected": {}},
        "UPLOADED applied must be a list of whole numbers",
    ),
    (
        FrameType.UPLOADED,
        {"batch": "b", "applied": [], "rejected": {"x": "no"}},
        "UPLOADED rejected must map each refused seq to its reason",
    ),
    (
        FrameType.UPLOADED,
        {"batch": "b", "applied": [], "rejected": {"1": 2}},
        "UPLOADED rejected must map each refused seq to its reason",
    ),
    (FrameType.DOWNLOAD, {"schema": {}}, "DOWNLOAD without a table"),
    (FrameType.DOWNLOAD, {"table": "t.t"}, f"DOWNLOAD of t.t: schema {SHAPE}"),
    (
        FrameType.DOWNLOAD,
        {"table": "t.t", "schema": ROUTES.to_json(), "upserts": [1]},
        "DOWNLOAD of t.t: upserts must be objects",
    ),
    (
        FrameType.DOWNLOAD,
        {"table": "t.t", "schema": ROUTES.to_json(), "deletes": {}},
        "DOWNLOAD of t.t: deletes must be objects",
    ),
    (FrameType.SYNC_END, {"publication": "p"}, "SYNC_END without a watermark"),
    (FrameType.SYNC_END, {"watermark": "1:2:"}, "SYNC_END without a publication"),
    (FrameType.SYNC_ERROR, {"error": 5}, "SYNC_ERROR error must be text"),
]


@pytest.mark.parametrize(("frame_type", "fields", "message"), BAD_ANSWERS)
def test_a_malformed_answer_is_refused_naming_the_field(
    frame_type: FrameType, fields: dict[str, Any], message: str
) -> None:
    decoders = {
        FrameType.UPLOADED: w.decode_uploaded,
        FrameType.DOWNLOAD: w.decode_download,
        FrameType.SYNC_END: w.decode_sync_end,
        FrameType.SYNC_ERROR: w.decode_sync_error,
    }
    with pytest.raises(Malformed) as refused:
        decoders[frame_type](json_frame(frame_type, fields))
    assert str(refused.value) == message


def test_a_frame_of_another_type_is_refused() -> None:
    with pytest.raises(Malformed, match="expected UPLOADED, got DOWNLOAD"):
        w.decode_uploaded(json_frame(FrameType.DOWNLOAD, {}))
    with pytest.raises(Malformed, match="SYNC_BEGIN payload must be a JSON object"):
        w.decode_sync_begin(Frame(FrameType.SYNC_BEGIN, b"[]"))
