"""Summarise the profiles ``bench_export.py --profile DIR [--perf]`` recorded.

For each ``*.pyspy.txt`` (py-spy's raw, collapsed stacks): the share of samples per leaf frame,
that is where the Python thread was when sampled, by function (``--lines``: by line). Under
uvloop the parents py-spy reports for a callback are not reliable (the C event loop calls into
Python without a frame of its own), so leaves are what to read; ``Runner.run`` as a leaf is time
in uvloop's C code, system calls included (socket receives and sends, their copies).

For each ``*.perf.data``: the server's CPU by cost category, as a share and in µs of CPU per
request, using the request rate ``bench_export.py`` measured over the same window (the
``.json`` next to it). perf sees kernel and native code that py-spy cannot.

Run from the repository root::

    .venv/bin/python benchmarks/profile_summary.py DIR/seqwrite-journal-0.*
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# Checked in order: the first pattern that matches a symbol (or its object file) wins.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("copy into the page cache (file writes)", r"copy_folio_from_iter_atomic"),
    (
        "ext4 and page cache, per page (file writes)",
        r"ext4_|block_write|block_commit|filemap_|xas_|folio|generic_perform_write|mark_buffer"
        r"|balance_dirty|jbd2|file_update_time|__mark_inode",
    ),
    (
        "copy to user space (socket receive, file read)",
        r"_copy_to_iter|simple_copy_to_iter|copy_page_to_iter|__check_object_size"
        r"|__virt_addr_valid|__skb_datagram_iter",
    ),
    ("copy from user space into socket buffers (send)", r"_copy_from_iter"),
    ("libc memmove (uvloop: received data into bytes objects)", r"__memmove"),
    ("CRC32C", r"crc32c"),
    ("Python interpreter and objects", r"libpython"),
    ("uvloop's C code", r"uvloop|loop\.cpython"),
)
OTHER_KERNEL = "other kernel: TCP, wake-ups, system calls, scheduling"
OTHER_USER = "other user space"
_PERF_LINE = re.compile(r"\s+([\d.]+)%\s+(\d+)\s+(\S+)\s+\[[.kgu]\]\s+(.*)$")
_DURATION = re.compile(r"sample duration\s*:\s*([\d.]+)\s*ms")


def leaves(path: Path, *, by_line: bool, top: int) -> list[str]:
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        if not by_line:
            leaf = re.sub(r":\d+\)$", ")", leaf)
        counts[leaf] += int(count)
    total = sum(counts.values())
    if not total:
        return [f"{path.name}: no samples"]
    out = [f"{path.name}: {total} samples, leaf frames"]
    out += [f"  {100 * n / total:5.1f}%  {leaf}" for leaf, n in counts.most_common(top)]
    return out


def _perf_report(perf: str, path: Path, *args: str) -> str:
    return subprocess.run(
        [perf, "report", "-i", str(path), "--stdio", *args],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


def categories(perf: str, path: Path, *, verbose: bool) -> list[str]:
    report = _perf_report(perf, path, "--no-children", "--sort", "dso,sym", "-n", "-g", "none")
    by: Counter[str] = Counter()
    others: Counter[str] = Counter()
    for line in report.splitlines():
        m = _PERF_LINE.match(line)
        if m is None:
            continue
        samples, dso, sym = int(m.group(2)), m.group(3), m.group(4).strip()
        for name, pattern in CATEGORIES:
            if re.search(pattern, sym) or re.search(pattern, dso):
                by[name] += samples
                break
        else:
            name = OTHER_KERNEL if dso.startswith("[kernel") else OTHER_USER
            by[name] += samples
            others[f"{name}: {sym}"] += samples
    total = sum(by.values())
    if not total:
        return [f"{path.name}: no samples"]
    header = _perf_report(perf, path, "--header-only")
    found = _DURATION.search(header)
    seconds = float(found.group(1)) / 1000 if found else None
    window_file = path.with_name(path.name.removesuffix(".perf.data") + ".json")
    rate: float | None = None
    if window_file.exists():
        rate = json.loads(window_file.read_text()).get("requests_per_s")
    # perf samples at 999 Hz per thread that is on a CPU: samples / 999 is CPU seconds.
    cpu_seconds = total / 999
    title = f"{path.name}: {total} samples"
    per_request: float | None = None
    if seconds and rate:
        per_request = cpu_seconds / seconds / rate * 1e6
        title += (
            f", {cpu_seconds / seconds:.2f} cores at {rate:.0f} requests/s:"
            f" {per_request:.1f} µs of CPU per request"
        )
    out = [title]
    for name, samples in by.most_common():
        share = samples / total
        cost = "" if per_request is None else f"{share * per_request:8.1f} µs"
        out.append(f"  {100 * share:5.1f}% {cost}  {name}")
    if verbose:
        out += [f"      {n:6d}  {sym}" for sym, n in others.most_common(12)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise bench_export.py --profile output.")
    parser.add_argument("files", nargs="+", type=Path, help="*.pyspy.txt and *.perf.data files")
    parser.add_argument("--lines", action="store_true", help="py-spy leaves by line")
    parser.add_argument("--top", type=int, default=15, help="py-spy leaves to show")
    parser.add_argument("-v", "--verbose", action="store_true", help="list 'other' symbols")
    args = parser.parse_args(argv)
    perf = shutil.which("perf")
    for path in args.files:
        if path.name.endswith(".pyspy.txt"):
            print("\n".join(leaves(path, by_line=args.lines, top=args.top)))
        elif path.name.endswith(".perf.data"):
            if perf is None:
                print(f"{path.name}: perf is not installed", file=sys.stderr)
                continue
            print("\n".join(categories(perf, path, verbose=args.verbose)))
        else:
            continue
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
