"""A device key that other users of the device could read is refused, as ssh refuses one.

The attacker is another local user of the device: a key file they can read
lets them act as the device (upload, confirm, read its publications). The
listener and ``pushsync sync`` refuse to start with such a key, say which file
and what to do, exit 2, and create nothing (no state folder, no database).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.cli import Run
from tests.support.keys import write_key

SECRET = bytes(range(32))
NOBODY = 65534


def device(tmp_path: Path, mode: int) -> Path:
    key = write_key(tmp_path / "truck-1.key", SECRET)
    key.chmod(mode)
    config = tmp_path / "truck-1.yaml"
    config.write_text(
        "device: truck-1\nsecret_file: truck-1.key\nstate_dir: state\n"
        'channels:\n  sync: {server: "127.0.0.1:9"}\n'
        "handlers:\n  - name: h\n    subject: sync\n    action: sync\n",
        encoding="utf-8",
    )
    return config


@pytest.mark.parametrize("command", ["listen", "sync"])
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602], ids=oct)
def test_a_key_open_to_others_is_refused(
    pushsync: Run, tmp_path: Path, command: str, mode: int
) -> None:
    config = device(tmp_path, mode)
    result = pushsync(command, str(config))
    assert result.returncode == 2, result.stderr
    key = tmp_path / "truck-1.key"
    assert f"{key}: the key file is open to other users (mode {mode:04o})" in result.stderr
    assert f"chmod 600 {key}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()  # nothing created


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away takes root")
def test_a_key_of_another_user_is_refused(pushsync: Run, tmp_path: Path) -> None:
    config = device(tmp_path, 0o600)
    os.chown(tmp_path / "truck-1.key", NOBODY, NOBODY)
    result = pushsync("sync", str(config))
    assert result.returncode == 2, result.stderr
    assert "belongs to another user" in result.stderr
    assert not (tmp_path / "state").exists()


def test_an_owner_only_key_is_accepted(pushsync: Run, tmp_path: Path) -> None:
    """The same command gets past the key: it fails later, connecting (exit 1)."""
    config = device(tmp_path, 0o600)
    result = pushsync("sync", str(config))
    assert "key file" not in result.stderr
    assert result.returncode == 1, result.stderr
