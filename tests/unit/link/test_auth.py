"""PSK challenge-response of docs/link-protocol.md: proofs pinned to the doc, bound to their
role, key, nonces and volume; key files read strictly."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmirror.errors import BlockmirrorError
from blockmirror.link.auth import (
    MIN_KEY_BYTES,
    AuthError,
    client_proof,
    is_token,
    load_psk,
    new_nonce,
    server_proof,
    verify,
)

KEY = b"correct horse battery staple"
NONCES = st.binary(min_size=32, max_size=32).map(bytes.hex)
KEYS = st.binary(min_size=MIN_KEY_BYTES, max_size=64)
VOLUMES = st.text(max_size=20)


def reference(key: bytes, label: str, first: str, second: str, volume: str) -> str:
    """The proof as docs/link-protocol.md spells it, computed without the module."""
    message = f"blockmirror-link-v1 {label}{first}{second}{volume}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def test_new_nonce_is_32_random_bytes_as_lowercase_hex() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    for nonce in nonces:
        assert is_token(nonce)
        assert len(bytes.fromhex(nonce)) == 32


@given(KEYS, NONCES, NONCES, VOLUMES)
def test_proofs_match_the_documented_messages(
    key: bytes, client_nonce: str, server_nonce: str, volume: str
) -> None:
    assert server_proof(key, client_nonce, server_nonce, volume) == reference(
        key, "server", client_nonce, server_nonce, volume
    )
    assert client_proof(key, server_nonce, client_nonce, volume) == reference(
        key, "client", server_nonce, client_nonce, volume
    )
    assert is_token(server_proof(key, client_nonce, server_nonce, volume))


@given(KEYS, NONCES, NONCES, NONCES, NONCES, VOLUMES)
def test_a_server_proof_is_never_a_client_proof(
    key: bytes, a: str, b: str, c: str, d: str, volume: str
) -> None:
    # Whatever nonces an attacker arranges, what one role proves is no use in the other role.
    server = server_proof(key, a, b, volume)
    assert server != client_proof(key, a, b, volume)
    assert server != client_proof(key, b, a, volume)
    assert server != client_proof(key, c, d, volume)


@given(KEYS, KEYS, NONCES, NONCES, VOLUMES)
def test_a_wrong_key_gives_a_wrong_proof(
    key: bytes, other: bytes, client_nonce: str, server_nonce: str, volume: str
) -> None:
    if key == other:
        return
    expected = client_proof(key, server_nonce, client_nonce, volume)
    assert not verify(expected, client_proof(other, server_nonce, client_nonce, volume))
    expected = server_proof(key, client_nonce, server_nonce, volume)
    assert not verify(expected, server_proof(other, client_nonce, server_nonce, volume))


def test_proofs_are_bound_to_nonces_and_volume() -> None:
    a, b, c = new_nonce(), new_nonce(), new_nonce()
    proof = server_proof(KEY, a, b, "db")
    assert verify(proof, server_proof(KEY, a, b, "db"))
    assert not verify(proof, server_proof(KEY, a, c, "db"))
    assert not verify(proof, server_proof(KEY, c, b, "db"))
    assert not verify(proof, server_proof(KEY, b, a, "db"))
    assert not verify(proof, server_proof(KEY, a, b, "db2"))


@pytest.mark.parametrize("bad", ["", "00" * 31, "00" * 33, "AB" * 32, "g0" * 32, " " + "0" * 63])
def test_malformed_nonces_are_a_caller_error(bad: str) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        server_proof(KEY, bad, new_nonce(), "db")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        client_proof(KEY, new_nonce(), bad, "db")
    assert not is_token(bad)


def test_verify_compares_whole_values() -> None:
    proof = server_proof(KEY, new_nonce(), new_nonce(), "db")
    assert verify(proof, proof)
    assert verify(proof, str(proof))
    assert not verify(proof, proof[:-1])
    assert not verify(proof, proof + "0")
    assert not verify(proof, "")
    assert not verify(proof, proof.upper())
    flipped = ("1" if proof[0] == "0" else "0") + proof[1:]
    assert not verify(proof, flipped)


@pytest.mark.parametrize("given_proof", ["é" * 64, "\ud800" * 64, "\x00" * 64])
def test_verify_never_raises_on_what_a_peer_sends(given_proof: str) -> None:
    # hmac.compare_digest alone raises TypeError for non-ASCII str; the peer chooses this value.
    assert not verify(server_proof(KEY, new_nonce(), new_nonce(), "db"), given_proof)
    assert verify(given_proof, given_proof)


def test_verify_is_hmac_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert verify("ab", "ab")
    assert calls == [(b"ab", b"ab")]


# --- key files ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "key"),
    [
        (b"0123456789abcdef", b"0123456789abcdef"),
        (b"0123456789abcdef\n", b"0123456789abcdef"),
        (b"0123456789abcdef \t\r\n\n", b"0123456789abcdef"),
        (b"  leading kept, inner  kept\n", b"  leading kept, inner  kept"),
        (bytes(range(256)), bytes(range(256))),  # binary keys are keys too
    ],
)
def test_load_psk_strips_trailing_whitespace_only(
    tmp_path: Path, content: bytes, key: bytes
) -> None:
    path = tmp_path / "psk"
    path.write_bytes(content)
    assert load_psk(path) == key
    assert load_psk(str(path)) == key


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b" \t\r\n", "is empty"),
        (
            b"x" * (MIN_KEY_BYTES - 1),
            f"is {MIN_KEY_BYTES - 1} bytes, need at least {MIN_KEY_BYTES}",
        ),
        (b"short\n\n", "is 5 bytes"),
    ],
)
def test_load_psk_refuses_empty_and_short_keys(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "psk"
    path.write_bytes(content)
    with pytest.raises(AuthError, match=reason):
        load_psk(path)


def test_load_psk_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match=r"cannot read pre-shared key file .*missing"):
        load_psk(tmp_path / "missing")
    with pytest.raises(AuthError, match="cannot read pre-shared key file"):
        load_psk(tmp_path)  # a directory
    if os.geteuid() != 0:  # root reads anything
        path = tmp_path / "locked"
        path.write_bytes(KEY)
        path.chmod(0)
        with pytest.raises(AuthError, match="Permission denied"):
            load_psk(path)


def test_auth_error_belongs_to_the_hierarchy() -> None:
    assert issubclass(AuthError, BlockmirrorError)
