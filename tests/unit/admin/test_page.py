"""The console page as the server renders it, and what its script may and may not do.

The page's behaviour in a browser is tested in ``tests/e2e/test_console.py``; here, the
security properties that hold whatever the script does: no inline script, nothing of the unit
before signing in, every status value escaped, the CSRF token only in a signed-in page, and a
script that never turns data into markup or reaches outside its own origin.
"""

from __future__ import annotations

import re
from typing import Any

from blockmirror.admin.page import COPYRIGHT, SCRIPT, render_page, render_sign_in

EVIL = '<img src=x onerror="alert(1)">'


def status(**extra: Any) -> dict[str, Any]:
    return {
        "unit": "site-a",
        "version": "1.2.3",
        "uptime_seconds": 12.5,
        "volumes": [{"name": "db", "role": "primary", "state": "serving", "size": 1 << 30}],
        **extra,
    }


def scripts(page: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>.*?</script>", page, flags=re.S | re.I)


def test_only_the_served_script_runs() -> None:
    for page in (render_sign_in(), render_page(status()), render_page(status(), csrf="c" * 43)):
        assert scripts(page) == ['<script src="/admin.js"></script>']
        # No handler attributes either: the policy (script-src 'self') would block them anyway.
        assert not re.search(r"\son[a-z]+\s*=", page, flags=re.I)


def test_the_sign_in_page_shows_nothing_of_the_unit() -> None:
    page = render_sign_in()
    assert 'id="signin"' in page and 'id="token"' in page and 'type="password"' in page
    assert 'name="csrf-token"' not in page and 'id="volumes"' not in page
    assert COPYRIGHT in page and "/api/log" not in page


def test_a_signed_in_page_has_the_console_the_csrf_token_and_the_footer() -> None:
    page = render_page(status(), csrf='tok"en<')
    assert '<meta name="csrf-token" content="tok&quot;en&lt;">' in page
    idents = "volumes message events active-events confirm confirm-ok confirm-cancel"
    for ident in (idents + " confirm-force log-download sign-out footer").split():
        assert f'id="{ident}"' in page, ident
    assert 'href="/api/log" download' in page
    assert 'id="signin"' not in page
    footer = re.search(r'<footer id="footer">(.*?)</footer>', page, flags=re.S)
    assert footer is not None
    text = re.sub(r"<[^>]+>", "", footer.group(1)).replace("&middot;", "·")
    assert text == "blockmirror 1.2.3 · © 2026 the blockmirror authors"
    # The confirmation is the page's own dialog, with buttons that are buttons.
    assert '<dialog id="confirm"' in page
    assert '<button type="button" id="confirm-ok">Confirm</button>' in page
    assert '<button type="button" id="confirm-cancel">Cancel</button>' in page


def test_a_public_page_without_a_session_reads_but_has_no_token_and_no_log() -> None:
    page = render_page(status())
    assert 'id="volumes"' in page and 'id="signin"' in page
    assert 'name="csrf-token"' not in page and "/api/log" not in page
    assert "<td>db</td>" in page  # the table for a browser without JavaScript


def test_everything_from_the_status_is_escaped() -> None:
    doc = status(unit=EVIL, version=EVIL)
    doc["volumes"][0]["name"] = EVIL
    doc["volumes"][0]["export"] = EVIL
    page = render_page(doc, csrf="c" * 43)
    assert EVIL not in page and "<img" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page


def test_the_script_never_makes_markup_of_data_nor_leaves_its_origin() -> None:
    sinks = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(")
    for sink in (*sinks, "new Function", 'setTimeout("', "javascript:"):
        assert sink not in SCRIPT, sink
    # Every URL it names is a path of this unit; the one absolute URL is SVG's namespace name.
    assert re.findall(r"https?://[^\"'`\s]*", SCRIPT) == ["http://www.w3.org/2000/svg"]
    for path in re.findall(r"fetch\(\s*([^,)]+)", SCRIPT):
        assert path.startswith('"/api/') or path in ("path", "button.dataset.path"), path
    assert 'new EventSource("/api/events")' in SCRIPT
    assert '"X-CSRF-Token": csrf' in SCRIPT
    assert "window.confirm" not in SCRIPT and "confirm(" not in SCRIPT.replace("#confirm", "")
