"""Alerts: one webhook for failed runs, staleness and failed SLO checks.

Alerts go to ``SESSION_CLEANUP_ALERT_WEBHOOK_URL`` as Slack incoming-webhook JSON
(``{"text": ...}``) when it is set, and to the caller's log as an error otherwise. Not
``dagster-slack``: it needs a bot token and reaches only Slack, where one webhook URL reaches
any chat or HTTP endpoint (docs/operations.md, "Alerts").
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

WEBHOOK_ENV = "SESSION_CLEANUP_ALERT_WEBHOOK_URL"


def post_alert(text: str, log: Any) -> None:
    """Send ``text`` to the webhook when one is configured, else log it as an error.

    Raises:
        ValueError: the webhook URL is not http(s).
        OSError: the webhook did not accept the message.
    """
    url = os.environ.get(WEBHOOK_ENV, "").strip()
    if not url:
        log.error("ALERT (set %s to send this to a webhook): %s", WEBHOOK_ENV, text)
        return
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"{WEBHOOK_ENV} must be an http(s) URL")
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url,
        data=json.dumps({"text": text}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        response.read()
    log.info("alert posted to the webhook: %s", text.splitlines()[0])
