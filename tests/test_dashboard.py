"""The dashboard at /-/dashboard, in a real headless browser.

Debian's chromium (/usr/bin/chromium) driven by Playwright for Python; the test is
skipped only when that browser is missing (``apt-get install chromium``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

import taskserve

from .helpers import running_gateway

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no /usr/bin/chromium for the browser test; apt-get install chromium")


class Model:
    def __call__(self, request):
        return "ok"


def test_dashboard_shows_deployments_and_follows_changes(connected, unique_name, tmp_path):
    model = taskserve.deployment(Model).options(name=unique_name, version="1", num_cpus=0.1)
    model.deploy()
    with running_gateway(connected) as http, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{http.base_url}/-/dashboard")

            card = page.locator(f'[data-deployment="{unique_name}"]')
            expect(card).to_have_attribute("data-status", "HEALTHY", timeout=10_000)
            expect(card.locator('[data-field="running"]')).to_have_text("1/1")
            expect(card.locator('[data-field="queue"]')).to_have_text("0")
            expect(card.locator('[data-node="node-a"] .replica[data-state="RUNNING"]')).to_have_count(1)
            expect(card.locator(".events")).to_contain_text("deploy")
            expect(card).to_contain_text(f"/{unique_name}")
            expect(page.locator("#summary")).to_contain_text("nodes alive")

            # The page refreshes itself: a scale shows up without a reload.
            taskserve.scale_deployment(unique_name, 2)
            expect(card.locator('[data-field="running"]')).to_have_text("2/2", timeout=10_000)
            expect(card.locator('.replica[data-state="RUNNING"]')).to_have_count(2)
            expect(card.locator(".events tr").first).to_contain_text("scale")
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

            model.delete()
            expect(card).to_have_count(0, timeout=10_000)
            assert errors == []
        finally:
            browser.close()


def test_dashboard_shows_a_deployments_jobs_by_state_and_the_oldest_waiting(connected, unique_name):
    idle = taskserve.deployment(Model).options(name=unique_name, num_replicas=0)
    idle.deploy()
    quiet = taskserve.deployment(Model).options(name=f"{unique_name}-quiet", num_replicas=0)
    quiet.deploy()
    for _ in range(2):
        idle.get_handle().submit("request")
    with running_gateway(connected) as http, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{http.base_url}/-/dashboard")
            jobs = page.locator(f'[data-deployment="{unique_name}"] [data-field="jobs"]')
            expect(jobs.locator('[data-job-state="QUEUED"] b')).to_have_text("2", timeout=10_000)
            expect(jobs.locator('[data-job-state="SUCCEEDED"] b')).to_have_text("0")
            expect(jobs.locator('[data-field="oldest-queued"]')).to_have_text(re.compile(r"^\d+(s|m)$"))
            expect(page.locator(f'[data-deployment="{unique_name}-quiet"]')).to_have_count(1)
            expect(page.locator(f'[data-deployment="{unique_name}-quiet"] [data-field="jobs"]')).to_have_count(0)
            assert errors == []
        finally:
            browser.close()
    idle.delete()
    quiet.delete()
