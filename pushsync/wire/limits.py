"""Sizes the wire protocol promises; the generator and the dispatcher check against them."""

MAX_DATAGRAM = 1200
"""Largest UDP datagram pushsync sends: fits the IPv6 minimum MTU (1,280) minus
headers, so no path fragments it."""

ENVELOPE_BUDGET = 256
"""Bytes of every datagram reserved for the envelope: version, request id,
device, sender, priority, times and signature. The encoder must stay within it."""

MAX_MESSAGE_TEXT = MAX_DATAGRAM - ENVELOPE_BUDGET
"""Most bytes (UTF-8) that subject and content of one message may take together."""
