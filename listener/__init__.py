"""The device side of pushsync: channels, message handlers, actions, the sync client.

Only the standard library, PyYAML and :mod:`pushsync.wire` may be imported from
here: devices install ``pushsync`` without the server extras.
"""
