"""``Type=notify`` (issue 11, systemd part): a fake NOTIFY_SOCKET receives READY=1 once the
unit serves, WATCHDOG=1 at half the WATCHDOG_USEC interval, RELOADING=1 and READY=1 around a
reload (SIGHUP), and STOPPING=1 on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.support.unit_process import fetch_status, start_unit, write_config

pytestmark = pytest.mark.e2e


def test_ready_watchdog_and_stopping_reach_the_notify_socket(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(10)
        vol = {
            "name": "vol",
            "role": "primary",
            "path": str(tmp_path / "vol.img"),
            "size": "4MiB",
            "export": "127.0.0.1:0",
            "journal_size": "2MiB",
        }
        config = write_config(tmp_path, volumes=[vol], state_dir=tmp_path / "state")
        unit = start_unit(
            config,
            tmp_path / "state",
            env_extra={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
        )
        try:
            first = sock.recv(4096).decode()
            assert "READY=1" in first.splitlines(), first
            assert f"MAINPID={unit.pid}" in first.splitlines(), first
            # Ready means serving: the status says so at once.
            assert fetch_status(unit)["volumes"][0]["state"] == "serving"
            beats = 0
            while beats < 5:  # every 0.2 s, half of WATCHDOG_USEC (the recv times out at 10 s)
                if sock.recv(4096).decode() == "WATCHDOG=1":
                    beats += 1
            # SIGHUP: RELOADING=1 (with the monotonic clock systemd asks for), then READY=1.
            config.write_text(config.read_text().replace('"2MiB"', '"2MiB"\ndescription = "v2"'))
            os.kill(unit.pid, signal.SIGHUP)
            reload_messages: list[str] = []
            while not any("READY=1" in m.splitlines() for m in reload_messages):
                message = sock.recv(4096).decode()
                if message != "WATCHDOG=1":
                    reload_messages.append(message)
            reloading = reload_messages[0].splitlines()
            assert "RELOADING=1" in reloading, reload_messages
            assert any(line.startswith("MONOTONIC_USEC=") for line in reloading), reloading
            assert len(reload_messages) == 2, reload_messages
            assert fetch_status(unit)["config_version"] == 2
            assert unit.terminate() == 0, unit.log()
            seen = []
            sock.settimeout(2)
            while True:
                try:
                    seen.append(sock.recv(4096).decode())
                except TimeoutError:
                    break
            assert "STOPPING=1" in seen, seen
        finally:
            unit.kill()
