"""The admin app's dashboard in a real headless Chromium, driven by Playwright: it loads clean,
follows the traffic, and its controls change what every request sees."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from starlette.applications import Starlette
from starlette.routing import Mount

from asgi_leasttime import LeastTimeProxy, Upstream
from asgi_leasttime.metrics import AdminApp
from tests.servers import UpstreamApp, free_port, running_in_thread, serve, wait_for_port

TOKEN = "a-token-of-at-least-16-characters"
SCREENSHOTS = Path(__file__).parent.parent / "docs" / "images"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Debian's chromium is needed: make test installs it"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


class Site:
    """Three upstreams, a proxy in front of them and its admin app under /admin."""

    def __init__(self, url: str, upstreams: list[UpstreamApp]) -> None:
        self.url = url
        self.upstreams = {u.name: u for u in upstreams}
        self.dashboard = url + "/admin/"

    def send(self, count: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            for _ in range(count):
                assert client.get("/").status_code == 200


@pytest.fixture
def site() -> Iterator[Site]:
    upstreams = [UpstreamApp(name) for name in ("a", "b", "c")]
    with (
        running_in_thread(upstreams[0]) as a,
        running_in_thread(upstreams[1]) as b,
        running_in_thread(upstreams[2]) as c,
    ):
        proxy = LeastTimeProxy(
            upstreams=[Upstream(a, name="a"), Upstream(b, name="b"), Upstream(c, name="c")]
        )
        app = Starlette(
            routes=[Mount("/admin", AdminApp(proxy, token=TOKEN)), Mount("/", proxy)],
            lifespan=lambda app: proxy.lifespan(),
        )
        with running_in_thread(app, lifespan="on") as url:
            yield Site(url, upstreams)


@pytest.fixture
def console_errors() -> list[str]:
    """What the page logs as errors; a test that causes one on purpose takes it out."""
    return []


@pytest.fixture
def page(browser: Browser, console_errors: list[str]) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    errors = console_errors

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == [], errors  # no console error, no uncaught exception, no CSP refusal


def row(page: Page, name: str) -> object:
    return page.locator(f'tr[data-upstream="{name}"]')


def enter_token(page: Page, token: str) -> None:
    page.get_by_label("Admin token").fill(token)
    page.get_by_label("Admin token").press("Enter")  # the form submits from the keyboard
    expect(page.locator("#token-state")).to_have_text("Token set for this tab.")


def test_the_page_shows_every_upstream_and_follows_the_traffic(site: Site, page: Page) -> None:
    page.goto(site.dashboard)
    for name in ("a", "b", "c"):
        expect(row(page, name).locator(".status")).to_have_text("▲ up")  # type: ignore[attr-defined]
    expect(page.locator("#summary")).to_contain_text("3 of 3 upstreams take new requests")
    expect(row(page, "a").locator("th .why")).to_contain_text("configured, since")  # type: ignore[attr-defined]
    site.send(30)
    total = page.locator('tr[data-upstream] td[data-label="Requests"]')
    expect(total.first).not_to_have_text("0", timeout=3000)
    page.wait_for_function(
        """() => [...document.querySelectorAll('td[data-label="Requests"]')]
                 .reduce((sum, cell) => sum + Number(cell.textContent), 0) === 30""",
        timeout=3000,
    )
    expect(page.locator('td[data-label="Share, last minute"]').first).to_contain_text("%")
    # A change made elsewhere (the write API, another process) shows within a second.
    httpx.post(
        site.url + "/admin/upstreams/b",
        json={"down": True},
        headers={"authorization": f"Bearer {TOKEN}"},
    ).raise_for_status()
    status = row(page, "b").locator(".status")  # type: ignore[attr-defined]
    expect(status).to_contain_text("down", timeout=2000)
    expect(status).to_contain_text("manual")  # why, in words: not colour alone


def test_draining_from_the_page_stops_new_requests_to_it(site: Site, page: Page) -> None:
    page.goto(site.dashboard)
    enter_token(page, TOKEN)
    drain = page.get_by_role("button", name="Drain a")
    drain.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#message")).to_contain_text("confirmed by the state that came back")
    expect(row(page, "a").locator(".status")).to_contain_text("draining")  # type: ignore[attr-defined]
    expect(page.get_by_role("button", name="Undrain a")).to_be_visible()
    before = site.upstreams["a"].requests
    site.send(30)
    assert site.upstreams["a"].requests == before
    page.get_by_label("New weight of b").fill("3")
    page.get_by_role("button", name="Set the weight of b").click()
    expect(row(page, "b").locator('td[data-label="Weight"]')).to_have_text("3")  # type: ignore[attr-defined]
    page.get_by_role("button", name="Mark down c").click()
    expect(row(page, "c").locator(".status")).to_contain_text("down")  # type: ignore[attr-defined]
    page.get_by_role("button", name="Mark up c").click()
    expect(row(page, "c").locator(".status")).to_have_text("▲ up")  # type: ignore[attr-defined]


def test_a_wrong_token_is_refused_and_changes_nothing(
    site: Site, page: Page, console_errors: list[str]
) -> None:
    page.goto(site.dashboard)
    page.get_by_role("button", name="Drain a").click()
    expect(page.locator("#message")).to_have_text("Enter the admin token first.")
    enter_token(page, "not-the-token-at-all")
    page.get_by_role("button", name="Drain a").click()
    expect(page.locator("#message")).to_contain_text("The token was refused")
    expect(page.locator("#token-state")).to_have_text("No token: the page only reads.")
    refused = [e for e in console_errors if "401 (Unauthorized)" in e]
    assert len(refused) == 1  # the browser logs the refused call itself
    console_errors.remove(refused[0])
    status = httpx.get(site.url + "/admin/status").json()
    assert not next(u for u in status["upstreams"] if u["name"] == "a")["fenced"]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_themes_and_a_phone_width_and_the_screenshots_of_the_docs(
    browser: Browser, site: Site, scheme: str, tmp_path: Path
) -> None:
    site.upstreams["a"].delay = 0.002  # three speeds, for plots worth looking at
    site.upstreams["b"].delay = 0.006
    for width, height, name in ((1280, 520, f"dashboard-{scheme}.png"),
                                (390, 900, f"dashboard-phone-{scheme}.png")):  # fmt: skip
        context = browser.new_context(
            viewport={"width": width, "height": height}, color_scheme=scheme
        )
        page = context.new_page()
        page.goto(site.dashboard)
        expect(row(page, "c").locator(".status")).to_have_text("▲ up")  # type: ignore[attr-defined]
        for _ in range(8):  # traffic over a few polls: the plots have lines
            site.send(15)
            page.wait_for_timeout(800)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == ("rgb(255, 255, 255)" if scheme == "light" else "rgb(13, 17, 23)")
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{overflow} px wider than a {width} px screen"
        # `make screenshots` refreshes the docs' pictures; otherwise they go to a temporary place.
        folder = SCREENSHOTS if os.environ.get("ASGI_LEASTTIME_SCREENSHOTS") else tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / name), full_page=True)
        assert (folder / name).stat().st_size > 10_000
        context.close()


# -- against the real commands --------------------------------------------------------------------


def test_the_demo_shows_its_dashboard_live(page: Page) -> None:
    """``asgi-leasttime demo`` prints the dashboard's address and token; the page follows it."""
    command = [sys.executable, "-m", "asgi_leasttime.cli", "demo", "--seconds", "20"]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert demo.stdout is not None
        line = ""
        for _ in range(5):
            line = demo.stdout.readline()
            if line.startswith("Dashboard:"):
                break
        found = re.match(r"Dashboard: (\S+) \(admin token for its controls: (\S+)\)", line)
        assert found, line
        url, token = found.groups()
        page.goto(url)
        for name in ("fast", "medium", "flaky"):
            expect(row(page, name)).to_be_visible()  # type: ignore[arg-type]
        requests = page.locator('tr[data-upstream="fast"] td[data-label="Requests"]')
        first = int(requests.text_content() or 0)
        page.wait_for_function(
            f"""() => Number(document.querySelector(
                  'tr[data-upstream="fast"] td[data-label="Requests"]').textContent) > {first}""",
            timeout=3000,
        )  # under traffic, the rows move
        enter_token(page, token)
        page.get_by_role("button", name="Drain fast").click()
        expect(page.locator("#message")).to_contain_text("confirmed")
        expect(row(page, "fast").locator(".status")).to_contain_text("draining")  # type: ignore[attr-defined]
    finally:
        page.goto("about:blank")  # first: no poll of a demo that is going
        demo.terminate()
        demo.wait(20)


def test_a_drain_clicked_on_the_page_reaches_every_worker(page: Page, tmp_path: Path) -> None:
    """serve --workers 2: the admin app in the supervisor, the workers on the private store."""
    a, b = UpstreamApp("a"), UpstreamApp("b")
    config = tmp_path / "lb.toml"
    with running_in_thread(a) as a_url, running_in_thread(b) as b_url:
        urls = {"a": httpx.URL(a_url), "b": httpx.URL(b_url)}
        admin_port = free_port()
        config.write_text(
            "".join(f'[[upstreams]]\nurl = "{u}"\nname = "{n}"\n' for n, u in urls.items())
            + f"[admin]\nport = {admin_port}\n"
        )
        environ = {"ASGI_LEASTTIME_ADMIN_TOKEN": TOKEN}
        process, port = serve(str(config), "--workers", "2", env=environ)
        try:
            wait_for_port(admin_port, process)
            page.goto(f"http://127.0.0.1:{admin_port}/dashboard")
            expect(row(page, "a").locator(".status")).to_have_text("▲ up")  # type: ignore[attr-defined]
            enter_token(page, TOKEN)
            page.get_by_role("button", name="Drain a").click()
            expect(page.locator("#message")).to_contain_text("confirmed")
            time.sleep(1.0)
            before = a.requests
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                for _ in range(100):  # new connections, so both workers answer
                    client.get("/", headers={"connection": "close"}).raise_for_status()
            assert a.requests == before
            assert b.requests >= 100
            expect(page.locator("#summary")).to_contain_text("2 processes sharing the state")
            # The workers' figures, from their reports: not the idle supervisor's zeros.
            cell = 'tr[data-upstream="b"] td[data-label="{}"]'
            expect(page.locator(cell.format("Avg TTFB"))).not_to_have_text("\u2013", timeout=5000)
            expect(page.locator(cell.format("Score"))).not_to_have_text("0.00 ms")
            page.wait_for_function(
                """() => Number(document.querySelector(
                     'tr[data-upstream="b"] td[data-label="Requests"]').textContent) >= 100""",
                timeout=5000,
            )
        finally:
            page.goto("about:blank")
            process.send_signal(signal.SIGINT)
            assert process.wait(20) == 0
