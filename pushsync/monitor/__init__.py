"""``pushsync monitor``: the operator's read-only web console.

A Starlette application served by uvicorn (:mod:`.server`) with five views
(fleet, flow, latency, timeline, one request) drawn in the browser by the
plain HTML, CSS and JavaScript of ``static/`` (no build step, nothing loaded
from elsewhere), and live updates by server-sent events. Every figure comes
from the ``pushsync`` schema through the bounded queries of
``sql/monitor.sql`` (:mod:`.data`) on read-only connections. Who may look is
:mod:`.access`: loopback without a token, any other address only with a
bearer token or TLS client certificates. ``docs/monitor.md`` is the reference.
"""
