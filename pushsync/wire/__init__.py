"""What the server and the device both speak: envelopes, frames, signing, limits, addresses.

Standard library only, and nothing of either side: the dispatcher and the
generator import it, and so does the listener, which devices install without
the server extras. The import contracts in ``pyproject.toml`` hold it to that.
"""
