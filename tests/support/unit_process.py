"""Run a real ``blockmirror run`` process for tests, and always stop it by its PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BLOCKMIRROR = [sys.executable, "-m", "blockmirror.cli"]
TEST_JOURNAL_SIZE = "16MiB"


def require_commands(*names: str) -> None:
    """Fail loudly (not skip) when a client the tests promise to use is missing."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise RuntimeError(f"missing test clients {missing}: run the tests through `make test`")


@dataclass
class UnitProcess:
    proc: subprocess.Popen[bytes]
    config_path: Path
    state_dir: Path
    log_path: Path
    runtime: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def export_url(self, volume: str) -> str:
        return f"nbd://{self.runtime['exports'][volume]}/{volume}"

    def export_address(self, volume: str) -> tuple[str, int]:
        host, port = str(self.runtime["exports"][volume]).rsplit(":", 1)
        return host, int(port)

    @property
    def admin(self) -> str:
        return str(self.runtime["admin"])

    @property
    def admin_token_file(self) -> Path:
        """Where the unit keeps its admin token (unit.json names the file, never the token)."""
        named = self.runtime.get("admin_token_file")
        return Path(named) if named else self.state_dir / "admin.token"

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def admin_headers(self) -> dict[str, str]:
        """The header every admin API request needs: ``Authorization: Bearer TOKEN``."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait; returns the exit code (SIGKILL only if it hangs, and then fails)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"unit {self.pid} ignored SIGTERM for {timeout}s") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_config(
    directory: Path,
    *,
    name: str = "unit",
    volumes: list[dict[str, Any]],
    admin: bool = True,
    replication: dict[str, Any] | None = None,
    state_dir: Path | None = None,
) -> Path:
    """A TOML config with ephemeral ports (port 0) for the admin API and every export."""
    state = state_dir or directory / "state"
    lines = ["[unit]", f'name = "{name}"', f'state_dir = "{state}"']
    if admin:
        lines.append('admin = "127.0.0.1:0"')
    if replication:
        lines.append("")
        lines.append("[replication]")
        for key, value in replication.items():
            lines.append(f"{key} = {json.dumps(value)}")
    for vol in volumes:
        lines.append("")
        lines.append("[[volume]]")
        # The product's default journal is 1 GiB, preallocated: a hundred test units would fill
        # a disk. Tests that need a bigger one say so.
        entry = {"journal_size": TEST_JOURNAL_SIZE, **vol}
        for key, value in entry.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start_unit(
    config_path: Path,
    state_dir: Path,
    *,
    timeout: float = 20.0,
    env_extra: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    prefix: list[str] | None = None,
) -> UnitProcess:
    log_path = config_path.with_suffix(".log")
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child; closed when we return
    runtime_file = state_dir / "unit.json"
    if runtime_file.exists():
        runtime_file.unlink()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    proc = subprocess.Popen(
        # ``prefix``: ``ip netns exec NS``, say, which execs in place (the PID stays the unit's).
        [*(prefix or []), *BLOCKMIRROR, "run", str(config_path), *(extra_args or [])],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"unit exited {proc.returncode}:\n{log_path.read_text()}")
        try:
            runtime = json.loads(runtime_file.read_text())
            if runtime.get("pid") == proc.pid:
                unit = UnitProcess(proc, config_path, state_dir, log_path, runtime)
                if runtime.get("admin"):
                    _TOKEN_FILES[unit.admin] = unit.admin_token_file
                return unit
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise AssertionError(f"unit did not come up in {timeout}s:\n{log_path.read_text()}")


@contextmanager
def running_unit(
    directory: Path, *, size: str | int = "64MiB", name: str = "unit", **volume: Any
) -> Iterator[UnitProcess]:
    """One primary volume named ``vol`` on ``directory/vol.img``; stopped on exit."""
    vol = {
        "name": "vol",
        "role": "primary",
        "path": str(directory / "vol.img"),
        "size": size,
        "export": "127.0.0.1:0",
    }
    vol.update(volume)
    config = write_config(directory, name=name, volumes=[vol])
    unit = start_unit(config, directory / "state")
    try:
        yield unit
    finally:
        unit.kill()


def free_port() -> int:
    """A port that was free a moment ago (for listeners that must keep their port on restart)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Admin address -> token file of the unit last started there, for helpers that are handed only
# the address.
_TOKEN_FILES: dict[str, Path] = {}


def admin_token_for(admin: str) -> str | None:
    """The admin token of the unit this test process started on ``admin``, if any."""
    path = _TOKEN_FILES.get(admin)
    return path.read_text().strip() if path is not None else None


def admin_request(
    unit: UnitProcess | str,
    method: str,
    path: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, Any]]:
    """One admin API request with the unit's token (unless ``headers`` brings its own
    Authorization); the status and the JSON body, also for an error status."""
    import urllib.error
    import urllib.request

    admin = unit.admin if isinstance(unit, UnitProcess) else unit
    if token is None:
        token = unit.admin_token if isinstance(unit, UnitProcess) else admin_token_for(admin)
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    sent.update(headers or {})
    if data is None and method == "POST":
        data = b""
    request = urllib.request.Request(f"http://{admin}{path}", data=data, method=method)
    for name, value in sent.items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    doc = json.loads(body) if body else {}
    assert isinstance(doc, dict), body
    return code, doc


def fetch_status(admin: UnitProcess | str, token: str | None = None) -> dict[str, Any]:
    """``GET /api/status`` with the unit's admin token."""
    code, data = admin_request(admin, "GET", "/api/status", token=token, timeout=5)
    assert code == 200, (code, data)
    return data
