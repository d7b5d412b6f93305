"""The device side of pushsync: channels, message handlers, actions, the wire protocol.

Only the standard library and PyYAML may be imported from here: devices install
``pushsync`` without the server extras.
"""
