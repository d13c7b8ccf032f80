"""Webhook registration errors say that an address is not allowed, never what a name resolves
to: a key with `webhooks:manage` must not be able to map the service's internal DNS."""

from __future__ import annotations

import httpx
import pytest

from services.api.app import create_app
from services.scorer.webhook_targets import NOT_ALLOWED, UnsafeTarget, resolve_target
from shared.settings import Settings


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost/hook",  # resolves to loopback
        "https://kam-no-such-host.invalid/hook",  # does not resolve at all
        "https://10.1.2.3/hook",
        "https://[::1]/hook",
    ],
)
async def test_refusals_are_alike_and_name_no_address(url: str) -> None:
    with pytest.raises(UnsafeTarget) as refused:
        await resolve_target(url, allowed_hosts=set())
    assert str(refused.value) == NOT_ALLOWED
    for address in ("127.0.0.1", "::1", "10.1.2.3", "localhost"):
        assert address not in str(refused.value)


async def test_registration_answer_is_the_same_for_every_refused_host(
    settings: Settings, admin_headers: dict[str, str]
) -> None:
    app = create_app(settings.model_copy(update={"webhook_allowed_hosts": set()}))
    details = set()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            for url in ("https://localhost/hook", "https://kam-no-such-host.invalid/hook"):
                response = await client.post(
                    "/v1/webhooks",
                    json={"url": url, "event_types": ["account.tier_changed"]},
                    headers=admin_headers,
                )
                assert response.status_code == 422
                assert "127.0.0.1" not in response.text
                details.add(response.json()["errors"][0]["message"])
    assert len(details) == 1
