"""A hub that stops heartbeating is shown as down to the administrator (issue 18): on the admin page, in
``tokenbridge hubs`` and in ``tokenbridge doctor``, not only in ``GET /v1/hubs``.

Two hubs, one SoftHSM card each, one PostgreSQL state (tests/pg.py, as tests/test_state_backends.py), with
heartbeats every 0.5 s and ``state.down_after`` = 2 s. Both are alive: the overview, the command (text and
``--json``), ``doctor`` and hub A's page in a French browser (tests/test_ui_fr.py) say so. Hub B is killed
(SIGKILL: no last word): past ``down_after``, hub A's page shows it down in red with a banner, the command
marks it DOWN, ``doctor`` warns; and ``tokenbridge hubs`` works with B's own service stopped.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Service, start_service
from tests.pg import Postgres
from tests.test_state_backends import fresh_database, postgres  # noqa: F401  (the tests' PostgreSQL)
from tests.test_tokens import demos  # noqa: F401  (SoftHSM cards, one per hub)
from tests.test_ui_fr import french_page  # noqa: F401  (a French administrator's headless Chromium)
from tokenbridge.tools.demo import DemoInfo

BEATS = {"TOKENBRIDGE_STATE__HEARTBEAT_INTERVAL": "0.5", "TOKENBRIDGE_STATE__DOWN_AFTER": "2"}


def wait_for(check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.2)


def hubs_view(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/v1/admin/overview")
    assert r.status_code == 200, r.text
    return dict(r.json()["hubs"])


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in items}


def line_of(output: str, hub: str) -> str:
    lines = [line for line in output.splitlines() if line.split(" ", 1)[0] == hub]
    assert len(lines) == 1, output
    return lines[0]


def test_a_hub_that_stops_heartbeating_is_shown_down(demos: list[DemoInfo], postgres: Postgres,  # noqa: F811
                                                     french_page: Any, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url = fresh_database(postgres)
    env = {**BEATS, "TOKENBRIDGE_STATE__DATABASE_URL": url}
    started: list[Service] = []
    try:
        for name, card in (("hub-a", demos[0]), ("hub-b", demos[1])):
            started.append(start_service(card.config_file, tmp_path / name, {**env, "TOKENBRIDGE_STATE__HUB": name}))
        a, b = started
        admin = a.add_client("chef", "admin")

        # The overview: both hubs, alive, with their address and keys (TOKEN/label).
        with a.http(admin) as c:
            view = wait_for(lambda: (v := hubs_view(c)) and len(v["hubs"]) == 2 and all(h["alive"] for h in v["hubs"])
                            and v, "both hubs alive in the overview")
        assert view["shared"] is True and view["hub"] == "hub-a" and view["error"] is None
        assert view["down_after"] == 2 and view["heartbeat_interval"] == 0.5
        hubs = by_name(view["hubs"])
        assert hubs["hub-a"]["self"] is True and hubs["hub-b"]["self"] is False
        assert hubs["hub-a"]["url"] == a.url and hubs["hub-b"]["url"] == b.url
        assert hubs["hub-b"]["heartbeat_age"] < 2
        b_keys = {f"{k['token']}/{k['label']}" for k in hubs["hub-b"]["keys"]}
        assert {"main/sign-rsa", "main/encrypt-rsa", "main/auth-ec"} <= b_keys, b_keys

        # The command, from the shared database: one line per hub, and JSON as GET /v1/hubs.
        text = a.cli("hubs").stdout
        mine, other = line_of(text, "hub-a"), line_of(text, "hub-b")
        assert mine.startswith("hub-a (this hub)  alive, last heartbeat ") and a.url in mine, text
        assert "alive, last heartbeat " in other and b.url in other and "main/sign-rsa" in other, text
        assert re.search(r"\b\d+ keys: ", other), text
        listed = by_name(json.loads(a.cli("hubs", "--json").stdout))
        assert set(listed) == {"hub-a", "hub-b"} and all(h["alive"] for h in listed.values())
        assert listed["hub-a"]["self"] and listed["hub-b"]["url"] == b.url
        doctor = " ".join(a.cli("doctor", check=False).stdout.split())  # rich wraps its lines at 80 columns
        assert "ok hubs: the other hubs sharing the database are alive: hub-b " in doctor, doctor

        # Hub A's page, in French: the panel, both hubs in service.
        page = french_page
        page.goto(f"{a.url}/ui")
        page.get_by_label("Secret d'API").fill(admin)
        page.get_by_role("button", name="Se connecter").click()
        expect(page.locator("#dashboard")).to_be_visible()
        expect(page.get_by_role("heading", name="Concentrateurs (hubs)", exact=True)).to_be_visible()
        expect(page.locator("#hubs-caption")).to_contain_text("toutes les 0,5 s")
        row_a = page.locator('#hubs-list tr[data-hub="hub-a"]')
        row_b = page.locator('#hubs-list tr[data-hub="hub-b"]')
        expect(row_a.locator("th")).to_contain_text("celui-ci")
        for row in (row_a, row_b):
            expect(row.locator("td.state .badge")).to_have_text("en service")
            expect(row.locator("td.state .badge")).to_have_class("badge ok")
            expect(row.locator("td.state")).to_contain_text("dernier signal")
        expect(row_b.locator("td.url")).to_have_text(b.url)
        expect(row_b.locator("td.keys")).to_contain_text("main/sign-rsa")
        expect(row_b.locator("td.keys")).to_contain_text(re.compile(r"\d+ clés"))
        expect(page.locator("#hubs-down")).to_be_hidden()

        # Hub B dies without a word; past state.down_after, it is down everywhere.
        b.process.send_signal(signal.SIGKILL)
        b.process.wait(10)
        expect(row_b).to_have_attribute("data-alive", "no", timeout=15_000)  # the page refreshes by itself
        expect(row_b.locator("td.state .badge")).to_have_text("arrêté")
        expect(row_b.locator("td.state .badge")).to_have_class("badge bad")
        expect(row_b.locator("td.state")).to_contain_text("dernier signal il y a")
        expect(page.locator("#hubs-down")).to_be_visible()
        expect(page.locator("#hubs-down")).to_contain_text("Le concentrateur hub-b est arrêté")
        expect(page.locator("#hubs-down")).to_contain_text("503 hub_down")
        expect(row_a.locator("td.state .badge")).to_have_text("en service")
        page.screenshot(path=str(tmp_path / "hubs-fr.png"), full_page=True)

        with a.http(admin) as c:
            hubs = by_name(hubs_view(c)["hubs"])
        assert hubs["hub-b"]["alive"] is False and hubs["hub-b"]["heartbeat_age"] > 2 and hubs["hub-a"]["alive"]
        text = a.cli("hubs").stdout
        assert "DOWN, last heartbeat " in line_of(text, "hub-b") and "(down after 2 s)" in line_of(text, "hub-b")
        assert "alive" in line_of(text, "hub-a"), text
        listed = by_name(json.loads(a.cli("hubs", "--json").stdout))
        assert listed["hub-b"]["alive"] is False and listed["hub-a"]["alive"] is True
        doctor = " ".join(a.cli("doctor", check=False).stdout.split())
        assert re.search(r"warn hub hub-b is down: its last heartbeat was [\d.]+ s ago \(state\.down_after = 2 s\); "
                         r"its keys answer 503 hub_down until it runs again \(http://", doctor), doctor
        assert "hubs: the other hubs" not in doctor
        # With its own service stopped, hub B's command still reads the database: itself down, A alive.
        r = b.cli("hubs")
        assert r.returncode == 0
        assert line_of(r.stdout, "hub-b").startswith("hub-b (this hub)  DOWN") and "alive" in line_of(r.stdout, "hub-a")
    finally:
        for service in started:
            service.stop()


def test_a_single_hub_has_no_hubs_panel_and_says_it_is_alone(service: Service) -> None:
    with service.http(service.add_client("chef-seul", "admin")) as c:
        view = hubs_view(c)
    assert view["shared"] is False and view["hubs"] == [] and view["error"] is None
    r = service.cli("hubs")
    assert r.returncode == 0 and r.stdout.startswith("only this hub (")
    assert "no shared database ([state] database_url is not set)" in r.stdout, r.stdout
    assert json.loads(service.cli("hubs", "--json").stdout) == []
    assert "hubs:" not in service.cli("doctor", check=False).stdout


@pytest.mark.parametrize(("seconds", "words"), [(0.43, "0.4 s"), (12.2, "12 s"), (300, "5 min"), (7200, "2 h"),
                                                (86400 * 3, "3 days")])
def test_heartbeat_ages_in_words(seconds: float, words: str) -> None:
    from tokenbridge.cli.hubs import age_words

    assert age_words(seconds) == words
