"""The web console in a real headless Chromium (Debian's ``chromium``, driven by Playwright's
sync API) against a real primary and secondary: sign-in through the page's form, a card per
volume with its peers, a consumer paused and resumed through the page's confirmation dialog
(checked in ``GET /api/status`` with the bearer token), the events an RPO breach raises and
clears, the lag graph's SVG, the log download, and a control's error shown with its message.

On failure every open page is saved as a screenshot in the test's ``tmp_path`` (kept for
failed tests) and the paths are printed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from tests.support.pair import (
    MiB,
    Site,
    find_peer,
    peer_address,
    run_client,
    topology,
    wait_caught_up,
)
from tests.support.unit_process import require_commands

pytestmark = pytest.mark.e2e

# The recipe's flags: root without a sandbox, no GPU, and nothing that reaches for the network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# How long the page may take to show what the unit did: two polls and a slow CI machine.
SHOWN = 15_000  # ms


def id_part(text: str) -> str:
    """The console's id of a name (console_script.py, idPart): ASCII letters, digits and ``-``
    stay, every other UTF-8 byte becomes ``_xx``."""
    return "".join(
        chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) == "-") else f"_{b:02x}"
        for b in text.encode()
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    require_commands("chromium", "qemu-io")
    chromium = shutil.which("chromium")
    assert chromium is not None
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@contextmanager
def screenshots_on_failure(context: BrowserContext, directory: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for i, page in enumerate(context.pages):
            path = directory / f"page-{i}.png"
            try:
                page.screenshot(path=str(path), full_page=True)
                print(f"screenshot of {page.url}: {path}")
            except PlaywrightError as exc:
                print(f"no screenshot of {page.url}: {exc}")
        raise


def sign_in(page: Page, site: Site) -> None:
    assert site.unit is not None
    page.goto(f"http://{site.unit.admin}/")
    expect(page.locator("#signin")).to_be_visible()
    assert page.locator("#volumes").count() == 0  # nothing of the unit before signing in
    page.fill("#token", "not-the-admin-token")
    page.click("#signin button[type=submit]")
    expect(page.locator("#message")).to_contain_text("wrong", timeout=SHOWN)
    page.fill("#token", site.unit.admin_token)
    page.click("#signin button[type=submit]")
    expect(page.locator("#volumes")).to_be_visible(timeout=SHOWN)


def confirm(page: Page, button: str, *, expect_text: str) -> None:
    """Click a control, check the page's own dialog asks, and confirm."""
    page.click(button)
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text(expect_text)
    page.click("#confirm-ok")
    expect(dialog).to_be_hidden()


def consumer(site: Site, address: str) -> dict[str, Any]:
    consumers: dict[str, dict[str, Any]] = site.volume_status()["journal"]["consumers"]
    return consumers[address]


def write_through_export(site: Site, megabytes: int) -> None:
    assert site.unit is not None
    url = site.unit.export_url("vol")
    proc = run_client(["qemu-io", "-f", "raw", url, "-c", f"write -P 0x5a 0 {megabytes}M"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_console_shows_the_pair_and_pauses_a_consumer(browser: Browser, tmp_path: Path) -> None:
    with topology(tmp_path) as topo:
        b = topo.add_secondary("site-b", volumes={"vol": 8 * MiB, "logs": 8 * MiB})
        a = topo.add_primary("site-a", peers=[peer_address(b)], size=8 * MiB)
        # An RPO of one second: a paused consumer breaches it at once, which is an event.
        with a.config.open("a") as config:
            config.write("\n[alerts]\nrpo_seconds = 1\n")
        b.start()
        a.start()
        wait_caught_up(a, b)
        address = peer_address(b)
        row = f"#peer-vol__{id_part(address)}"
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        try:
            with screenshots_on_failure(context, tmp_path):
                page = context.new_page()
                sign_in(page, a)
                check_primary(page, a, address, row)
                check_events_and_graph(page, a, b, address, row)
                check_link_limit(page, a, address, row)
                check_log_and_errors(page, a)
                secondary = context.new_page()
                sign_in(secondary, b)
                check_secondary(secondary, b)
                check_graph(page, address)
        finally:
            context.close()


def check_primary(page: Page, a: Site, address: str, row: str) -> None:
    status = a.status()
    card = page.locator("#volume-vol")
    expect(card).to_be_visible(timeout=SHOWN)
    expect(page.locator("#volumes > section.volume")).to_have_count(len(status["volumes"]))
    expect(card.locator("h2")).to_contain_text("primary")
    expect(card.locator("h2 .state")).to_have_text("serving")
    expect(page.locator("#journal-fill-vol")).to_be_attached()
    peers = card.locator("tr.peer")
    expect(peers).to_have_count(len(status["volumes"][0]["peers"]))
    expect(page.locator(row)).to_have_attribute("data-peer", address)
    expect(page.locator(f"{row} td.state")).to_have_text("replicating", timeout=SHOWN)
    expect(page.locator(f"{row} td.mode")).to_have_text("journal")
    footer = f"blockmirror {status['version']} · © 2026 the blockmirror authors"
    expect(page.locator("#footer")).to_have_text(footer)
    # The primary's controls: journal pause and demote, never promote.
    expect(page.locator("#journal-pause-vol")).to_be_visible()
    expect(page.locator("#demote-vol")).to_be_visible()
    expect(page.locator("#promote-vol")).to_be_hidden()

    # Cancel changes nothing.
    pause = f"#consumer-pause-vol__{id_part(address)}"
    page.click(pause)
    expect(page.locator("#confirm")).to_be_visible()
    page.click("#confirm-cancel")
    expect(page.locator("#confirm")).to_be_hidden()
    assert consumer(a, address)["paused"] is False

    confirm(page, pause, expect_text=address)
    expect(page.locator("#message")).to_contain_text("done", timeout=SHOWN)
    assert consumer(a, address)["paused"] is True
    assert find_peer(a, address)["state"] == "paused"
    expect(page.locator(f"{row} td.state")).to_have_text("paused", timeout=SHOWN)
    expect(page.locator(pause)).to_be_hidden()
    expect(page.locator(f"#consumer-resume-vol__{id_part(address)}")).to_be_visible()


def check_events_and_graph(page: Page, a: Site, b: Site, address: str, row: str) -> None:
    # Paused, the peer falls behind the writes: past rpo_seconds that is an open event.
    write_through_export(a, 2)
    raised = page.locator('#active-events li[data-event="rpo-exceeded"]')
    expect(raised).to_have_count(1, timeout=SHOWN)
    expect(raised).to_contain_text(address)
    expect(page.locator('#alerts-vol li[data-event="rpo-exceeded"]')).to_have_count(1)
    expect(page.locator("#events-note")).to_have_text("live")  # the event stream, not polls
    expect(page.locator(f"{row} td.lagBytes")).not_to_have_text("0 B", timeout=SHOWN)

    resume = f"#consumer-resume-vol__{id_part(address)}"
    confirm(page, resume, expect_text=address)
    expect(page.locator("#message")).to_contain_text("done", timeout=SHOWN)
    assert consumer(a, address)["paused"] is False
    wait_caught_up(a, b)
    expect(page.locator(f"{row} td.state")).to_have_text("replicating", timeout=SHOWN)
    cleared = page.locator('#events li[data-event="rpo-exceeded"][data-state="cleared"]')
    expect(cleared).to_have_count(1, timeout=SHOWN)
    expect(raised).to_have_count(0)
    expect(page.locator("#no-active-events")).to_be_visible()


def check_link_limit(page: Page, a: Site, address: str, row: str) -> None:
    # A link setting: the value is typed into the confirmation dialog.
    limit = f"#link-limit-vol__{id_part(address)}"
    page.click(limit)
    expect(page.locator("#confirm-rate-row")).to_be_visible()
    expect(page.locator("#confirm-rate")).to_have_value("none")
    page.fill("#confirm-rate", "8Mbit")
    page.click("#confirm-ok")
    expect(page.locator("#message")).to_contain_text("done", timeout=SHOWN)
    assert find_peer(a, address)["rate_limit"] == 8_000_000
    expect(page.locator(f"{row} td.link")).to_have_text("limit 8 Mbit/s", timeout=SHOWN)
    # A bad value: the unit's message, nothing changed.
    page.click(limit)
    expect(page.locator("#confirm-rate")).to_have_value("8000000bit")
    page.fill("#confirm-rate", "fast")
    page.click("#confirm-ok")
    expect(page.locator("#message")).to_contain_text("invalid bandwidth", timeout=SHOWN)
    assert find_peer(a, address)["rate_limit"] == 8_000_000
    page.click(limit)
    page.fill("#confirm-rate", "none")
    page.click("#confirm-ok")
    expect(page.locator(f"{row} td.link")).not_to_contain_text("limit", timeout=SHOWN)
    assert find_peer(a, address)["rate_limit"] is None
    # Other controls show no rate field.
    page.click(f"#consumer-pause-vol__{id_part(address)}")
    expect(page.locator("#confirm-rate-row")).to_be_hidden()
    page.click("#confirm-cancel")


def check_graph(page: Page, address: str) -> None:
    # The lag graph: an SVG the script drew, a series for the peer, ticks in seconds...
    graph = page.locator("svg#graph-vol")
    expect(graph).to_be_visible()
    series = graph.locator(f'g.series[data-peer="{address}"]')
    expect(series).to_have_count(1, timeout=SHOWN)
    expect(graph).to_have_attribute("data-points", re.compile(r"^[1-9][0-9]*$"), timeout=SHOWN)
    expect(series.locator("polyline, circle").first).to_be_attached()
    expect(graph.locator("text.tick").last).to_have_text("now")
    # ... and in bytes after the toggle.
    page.click("#graph-mode-vol")
    expect(page.locator("#graph-mode-vol")).to_have_attribute("aria-pressed", "true")
    expect(graph.locator("text.tick").nth(2)).to_contain_text("B")


def check_log_and_errors(page: Page, a: Site) -> None:
    link = page.locator("#log-download")
    expect(link).to_have_attribute("href", "/api/log")
    with page.expect_download() as info:
        link.click()
    download = info.value
    assert download.suggested_filename.startswith("blockmirror-site-a"), download.suggested_filename
    text = Path(download.path()).read_text()
    assert "consumer" in text and "paused by the operator" in text, text[-2000:]

    # A control the unit refuses: its message is shown, and nothing changed. (The refusal
    # comes from an intercepted request, since every control this pair offers would succeed.)
    refusal = '{"error": "refused for the console test"}'
    page.route(
        "**/api/volumes/vol/journal/pause",
        lambda route: route.fulfill(status=409, content_type="application/json", body=refusal),
    )
    confirm(page, "#journal-pause-vol", expect_text="Pause the journal of vol")
    message = page.locator("#message")
    expect(message).to_contain_text("refused for the console test", timeout=SHOWN)
    expect(message).to_have_class(re.compile(r"\berror\b"))
    assert a.volume_status()["journal"]["enqueue_paused"] is False
    page.unroute("**/api/volumes/vol/journal/pause")


def check_secondary(page: Page, b: Site) -> None:
    status = b.status()
    names = sorted(v["name"] for v in status["volumes"])
    assert names == ["logs", "vol"]
    cards = page.locator("#volumes > section.volume")
    expect(cards).to_have_count(2, timeout=SHOWN)
    assert sorted(cards.evaluate_all("cs => cs.map(c => c.dataset.volume)")) == names
    for name in names:
        card = page.locator(f"#volume-{id_part(name)}")
        expect(card.locator("h2 .role")).to_have_text("secondary")
        expect(page.locator(f"#replica-{id_part(name)}")).to_contain_text("Replica:")
        # A secondary's controls: promote, never a journal pause.
        expect(page.locator(f"#promote-{id_part(name)}")).to_be_visible()
        expect(page.locator(f"#journal-pause-{id_part(name)}")).to_be_hidden()
    expect(page.locator("#replica-vol")).to_contain_text("consistent")
    expect(page.locator("#replica-vol")).not_to_contain_text("source none", timeout=SHOWN)
    expect(page.locator("#replica-logs")).to_contain_text("source none")
