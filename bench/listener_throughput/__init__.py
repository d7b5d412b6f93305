"""Messages per second one ``pushsync listen`` handles over UDP, and its RSS at idle.

``python -m bench.listener_throughput`` starts the real ``pushsync listen``
CLI and a bare asyncio UDP receiver (the baseline, :mod:`.peers`) as
subprocesses, sends each the same kind of signed datagrams with a window of
unacknowledged messages, and reports msgs/s, ratios against the baseline, and
the listener's VmRSS. See ``README.md``.
"""
