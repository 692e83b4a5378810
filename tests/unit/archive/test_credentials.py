"""Where the archive's S3 credentials come from, what a broken credentials file is told as (never
quoting the secret), and the archive URL they go with."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from blockmirror.archive.s3 import (
    ArchiveStoreError,
    ArchiveUrl,
    Credentials,
    load_credentials,
    parse_url,
)

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLE%KEY"


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "credentials"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_file_default_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# a comment\n[default]\naws_access_key_id = AKIDEXAMPLE\n"
        f"aws_secret_access_key = {SECRET}\n\n[other]\naws_access_key_id = X\n",
    )
    creds = load_credentials(path, environ={"AWS_ACCESS_KEY_ID": "ignored"})
    # '%' is kept as is: no interpolation.
    assert creds == Credentials("AKIDEXAMPLE", SECRET, None)
    assert SECRET not in repr(creds)


def test_file_session_token_and_profile(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[default]\naws_access_key_id = A\naws_secret_access_key = B\n"
        "[ci]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=T\n",
    )
    assert load_credentials(path, profile="ci") == Credentials("C", "D", "T")
    assert repr(load_credentials(path, profile="ci")) == "Credentials(access_key_id='C')"


def test_file_with_bom_and_upper_case_keys(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_bytes(b"\xef\xbb\xbf[default]\nAWS_ACCESS_KEY_ID = A\nAWS_SECRET_ACCESS_KEY = B\n")
    path.chmod(0o600)
    assert load_credentials(path) == Credentials("A", "B", None)


def test_environment(tmp_path: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "B"}
    assert load_credentials(None, environ=env) == Credentials("A", "B", None)
    env["AWS_SESSION_TOKEN"] = "T"
    assert load_credentials(None, environ=env) == Credentials("A", "B", "T")
    # The variables win over a shared file named in the environment.
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "absent")
    assert load_credentials(None, environ=env).access_key_id == "A"


def test_environment_half_set() -> None:
    with pytest.raises(ArchiveStoreError, match="AWS_SECRET_ACCESS_KEY is not set"):
        load_credentials(None, environ={"AWS_ACCESS_KEY_ID": "A"})
    with pytest.raises(ArchiveStoreError, match="AWS_ACCESS_KEY_ID is not set"):
        load_credentials(None, environ={"AWS_SECRET_ACCESS_KEY": SECRET})


def test_shared_credentials_file_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "[default]\naws_access_key_id = A\naws_secret_access_key = B\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(path)}
    assert load_credentials(None, environ=env) == Credentials("A", "B", None)


def test_nothing_anywhere() -> None:
    with pytest.raises(ArchiveStoreError, match="no S3 credentials"):
        load_credentials(None, environ={"HOME": "/root"})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArchiveStoreError, match="does not exist"):
        load_credentials(tmp_path / "absent")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ArchiveStoreError, match="not a regular file"):
        load_credentials(tmp_path)


def test_missing_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[prod]\naws_access_key_id = A\naws_secret_access_key = B\n")
    with pytest.raises(ArchiveStoreError, match=r"no \[default\] section"):
        load_credentials(path)


@pytest.mark.parametrize("missing", ["aws_access_key_id", "aws_secret_access_key"])
def test_missing_key(tmp_path: Path, missing: str) -> None:
    lines = {"aws_access_key_id": "A", "aws_secret_access_key": SECRET}
    lines[missing] = ""  # present but empty counts as missing
    text = "[default]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items())
    with pytest.raises(ArchiveStoreError, match=f"has no {missing}"):
        load_credentials(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"aws_secret_access_key = {SECRET}\n", "line 1: a key before any"),
        (f"[default]\naws_access_key_id = A\n{SECRET}\n", r"line\(s\) 3"),
        ("[default]\n[default]\n", "section \\[default\\] twice"),
        (
            f"[default]\naws_secret_access_key = {SECRET}\naws_secret_access_key = {SECRET}\n",
            "aws_secret_access_key twice",
        ),
    ],
)
def test_broken_file_never_quotes_the_secret(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ArchiveStoreError, match=match) as broken:
        load_credentials(write(tmp_path, text))
    assert SECRET not in str(broken.value)
    assert broken.value.__cause__ is None and broken.value.__suppress_context__


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_bytes(b"[default]\naws_access_key_id = \xff\n")
    with pytest.raises(ArchiveStoreError, match="not UTF-8"):
        load_credentials(path)


def test_readable_by_others_warns_without_the_secret(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = f"[default]\naws_access_key_id = A\naws_secret_access_key = {SECRET}\n"
    with caplog.at_level(logging.DEBUG, logger="blockmirror.archive.s3"):
        assert load_credentials(write(tmp_path, text, 0o644)).secret_access_key == SECRET
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "readable by group or others" in warning.getMessage()
    assert "644" in warning.getMessage()
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="blockmirror.archive.s3"):
        load_credentials(write(tmp_path, text, 0o600))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- the archive URL ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://my.bucket-1/some/prefix", "my.bucket-1", "some/prefix"),
        ("s3://abc//some/prefix//", "abc", "some/prefix"),
        ("s3://" + "b" * 63 + "/p", "b" * 63, "p"),
    ],
)
def test_parse_url(url: str, bucket: str, prefix: str) -> None:
    assert parse_url(url) == ArchiveUrl(bucket, prefix)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("bucket/prefix", "must look like"),
        ("https://bucket/prefix", "must look like"),
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://ab/prefix", "bad bucket name"),
        ("s3://" + "b" * 64, "bad bucket name"),
        ("s3://Bucket/prefix", "bad bucket name"),
        ("s3://bucket_1/prefix", "bad bucket name"),
        ("s3://-bucket/prefix", "bad bucket name"),
        ("s3://bucket/a//b", "empty, '.' or '..' segment"),
        ("s3://bucket/a/../b", "empty, '.' or '..' segment"),
        ("s3://bucket/a\nb", "control character"),
    ],
)
def test_parse_url_refuses(url: str, match: str) -> None:
    with pytest.raises(ArchiveStoreError, match=match):
        parse_url(url)


def test_url_key() -> None:
    assert parse_url("s3://bucket/some/prefix").key("vol/claim") == "some/prefix/vol/claim"
    assert parse_url("s3://bucket/some/prefix").key("") == "some/prefix/"
    assert parse_url("s3://bucket").key("vol/claim") == "vol/claim"
    assert parse_url("s3://bucket").key("") == ""
    with pytest.raises(ArchiveStoreError, match="must not start with"):
        parse_url("s3://bucket/p").key("/vol")
    assert str(parse_url("s3://bucket/some/prefix/")) == "s3://bucket/some/prefix"
