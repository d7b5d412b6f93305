"""``pushsync init [DIR]``: a starting point — rules, a table, a listener config, a key.

Every file is new (nothing is overwritten) and the rules file passes
``pushsync check``; :data:`NEXT` is what to run then.
"""

from __future__ import annotations

import os
from pathlib import Path

from pushsync.devices import check_device_id, new_secret
from pushsync.errors import UsageError
from pushsync.wire import protocol

SCHEMA = """\
-- An example table to try pushsync on: tasks, each assigned to a device.
-- Apply it to your database (psql -f schema.sql), or write rules for your own tables.
CREATE TABLE IF NOT EXISTS public.tasks (
    task_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id text NOT NULL,
    title     text NOT NULL,
    done      boolean NOT NULL DEFAULT false
);
"""

RULES = """\
# pushsync rules: which changes tell which devices, and what each device holds.
# Reference: docs/rules.md. Check with `pushsync check rules.yaml` (add --dsn to
# check it against the database too); apply with `pushsync migrate`.
version: 1
defaults:
  gateway: auto          # a live SYNC connection, else UDP, else email
  ttl: 1h                # unconfirmed after this long: expired, never sent again
  resend_every: 5m       # unconfirmed: sent again after this long

rules:
  # A task assigned to a device, or changed: tell that device to synchronize.
  - name: task_changed
    table: public.tasks
    on: [insert, update]
    columns: [device_id, title]   # an update of other columns tells nobody
    recipients: SELECT t.device_id FROM public.tasks t WHERE t.task_id = new.task_id
    subject: sync
    content: "task {new.task_id}"

# What a device downloads into its local database, and what it may upload.
publications:
  - name: tasks
    tables:
      - table: public.tasks
        download: SELECT t.* FROM public.tasks t WHERE t.device_id = :device_id
        upload: [update]          # a device may mark its own tasks done
        conflict: server_wins
"""

LISTENER = """\
# The listener of device {device}: `pushsync listen listener.yaml`.
# Reference: docs/listener.md. Paths are relative to this file.
device: {device}
secret_file: device.key       # mode 0600; register it: pushsync device add --secret-from
state_dir: state              # this device's own folder: one listener per state_dir
publication: tasks
channels:
  sync: {{server: "127.0.0.1:2439"}}   # the dispatcher's --sync-listen
handlers:
  - name: synchronize
    subject: sync
    action: sync              # download what changed into state/, upload local edits
  - name: everything-else     # a catch-all, so that every message is confirmed
    action: {{run: [logger, -t, pushsync, "[$subject] $content"]}}
"""

GITIGNORE = """\
# Device keys and the listener's state never go into version control.
*.key
state/
"""

NEXT = """\
next, with DSN your database (or PUSHSYNC_DSN set):
  psql "$DSN" -f {dir}/schema.sql                       # the example table, or your own
  pushsync migrate --dsn "$DSN" {dir}/rules.yaml
  pushsync device add {device} --dsn "$DSN" --secret-from {dir}/device.key --publication tasks
  pushsync dispatch --dsn "$DSN" --sync-listen 127.0.0.1:2439 &
  pushsync listen {dir}/listener.yaml &
  pushsync send {device} sync hello --wait --dsn "$DSN"
"""


def scaffold(directory: Path, device: str) -> list[Path]:
    """Write the starting files into ``directory`` (made if missing); the paths written.

    UsageError, and nothing written, if any of them exists already.
    """
    check_device_id(device)
    files = {
        "rules.yaml": RULES,
        "schema.sql": SCHEMA,
        "listener.yaml": LISTENER.format(device=device),
        ".gitignore": GITIGNORE,
    }
    targets = [directory / name for name in (*files, "device.key")]
    taken = [str(path) for path in targets if path.exists()]
    if taken:
        raise UsageError(f"not overwriting {', '.join(taken)}: choose another directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {directory}: {exc.strerror}") from exc
    written: list[Path] = []
    try:
        for name, text in files.items():
            _write_new(directory / name, text, 0o644)
            written.append(directory / name)
        _write_new(directory / "device.key", protocol.format_secret(new_secret()), 0o600)
        written.append(directory / "device.key")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def _write_new(path: Path, text: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
