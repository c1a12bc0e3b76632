"""`lookalike page`: where the shopper's page is, whether it answers, and open it in a browser."""

from __future__ import annotations

import json
import time
import urllib.request
import webbrowser

from gateway.settings import GatewaySettings


def page_url(settings: GatewaySettings | None = None) -> str:
    """The gateway's address as a browser on this machine reaches it."""
    settings = settings or GatewaySettings()
    host = "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::", "") else settings.gateway_host
    return f"http://{host}:{settings.gateway_port}/"


def wait_healthy(url: str, timeout_s: float = 30.0) -> dict | None:
    """The gateway's /healthz facts once it says healthy; None if it does not within the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=3) as response:
                facts = json.loads(response.read())
                if facts.get("healthy"):
                    return facts
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    return None


def open_page(*, browser: bool = True, timeout_s: float = 30.0) -> int:
    url = page_url()
    facts = wait_healthy(url, timeout_s)
    if facts is None:
        print(f"no gateway answers at {url}healthz: `lookalike services up` starts one "
              "(its log: `lookalike services status`)")
        return 1
    pictures = facts.get("pictures", {})
    print(f"the shopper's page: {url}   (API: {url}docs; item pictures held: {pictures.get('items', 0)})")
    if browser and not webbrowser.open(url):
        print("no browser to open here: open the URL above yourself")
    return 0
