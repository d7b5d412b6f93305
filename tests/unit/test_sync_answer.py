"""The answer to an upload batch always fits one frame and always lists every seq."""

from __future__ import annotations

from pushsync.dispatcher.sync_endpoint import MAX_UPLOAD_ROWS, _answer
from pushsync.wire import protocol


def test_the_largest_answer_fits_one_frame_with_every_seq() -> None:
    seqs = [str(10**12 + n) for n in range(MAX_UPLOAD_ROWS)]
    result = {"applied": [], "rejected": {seq: "é refused " * 40 for seq in seqs}}
    answer = _answer("instance:1-2000" * 4, result)
    frame = protocol.encode_json_frame(protocol.FrameType.UPLOADED, answer)  # no Oversized
    [decoded] = protocol.FrameReader().feed(frame)
    payload = protocol.decode_json_frame(decoded, protocol.FrameType.UPLOADED)
    assert sorted(payload["rejected"]) == sorted(seqs)
    small = {"applied": [1, 2], "rejected": {"3": "a reason kept whole"}}
    assert _answer("b", small) == {"batch": "b", **small}
