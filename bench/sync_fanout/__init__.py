"""Fan-out and connection benchmark of the dispatcher: see ``README.md``."""
