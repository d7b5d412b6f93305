"""The SQL pushsync runs: base-schema migrations (``NNNN_name.sql``) and named queries.

Data only, read with ``importlib.resources.files("pushsync.sql")``.
"""
