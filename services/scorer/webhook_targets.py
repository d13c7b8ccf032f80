"""Where a webhook may be sent: the guard against server-side request forgery.

A subscriber names a URL; the service then connects to it from inside its own network, so a
URL must not reach anything that only the service can reach (the cloud metadata service at
169.254.169.254, a database on 10.x, the host itself). The rule: https only, and every address
the host resolves to must be a public one. It is checked when an endpoint is registered and
again before every send, because DNS answers change.

The send connects to the address that was checked (the URL's host is replaced by the address,
with the name kept for the ``Host`` header and for TLS: SNI and certificate verification), so a
name that resolves to a public address for the check and to a private one a moment later
(DNS rebinding) cannot slip through between the two.

Hosts in ``webhook_allowed_hosts`` (development and tests only; refused in production) may use
plain http and skip the address check: that is how a receiver on loopback is reached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
RESOLVE_TIMEOUT_S = 3.0


NOT_ALLOWED = (
    "The URL's host is not allowed: webhooks go to hosts that resolve, from here, to public "
    "addresses only."
)


class UnsafeTarget(ValueError):
    """The URL may not receive webhooks; the message says why, for the subscriber."""


@dataclass(frozen=True)
class Target:
    """Where to connect: ``url`` (with the checked address in place of the name, when there
    was a check), and the name for the ``Host`` header and TLS."""

    url: str
    host: str  # the name, for TLS
    host_header: str  # the name and port as the URL gave them, for the Host header
    address: IPAddress | None  # None for an allow-listed host: connect by name


def blocked_address(address: IPAddress) -> bool:
    """Whether an address is one a webhook must never reach."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None and blocked_address(mapped):
            return True
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
        or not address.is_global
    )


def parse_webhook_url(url: str, *, allowed_hosts: Collection[str]) -> SplitResult:
    """The URL's parts, if its form is acceptable (the address is checked separately)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeTarget(f"The URL is not valid: {exc}.") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise UnsafeTarget("The URL names no host.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("The URL may not carry credentials; use the signing secret.")
    if parts.fragment:
        raise UnsafeTarget("The URL may not carry a fragment.")
    allowed = host in allowed_hosts
    if parts.scheme != "https" and not (allowed and parts.scheme == "http"):
        raise UnsafeTarget("The URL must use https.")
    if port == 0:
        raise UnsafeTarget("The URL's port is not valid.")
    return parts


async def resolve_target(url: str, *, allowed_hosts: Collection[str]) -> Target:
    """Check ``url`` and resolve it to the address to connect to; raises ``UnsafeTarget``."""
    parts = parse_webhook_url(url, allowed_hosts=allowed_hosts)
    host = (parts.hostname or "").lower()
    if host in allowed_hosts:
        return Target(url=url, host=host, host_header=parts.netloc, address=None)
    port = parts.port or 443
    addresses = await _addresses(host, port)
    # One answer for a name that does not resolve and one that resolves to a blocked address,
    # and never the address: the caller must not learn what names resolve to inside the
    # service's network.
    if not addresses or any(blocked_address(a) for a in addresses):
        raise UnsafeTarget(NOT_ALLOWED)
    address = addresses[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    return Target(
        url=parts._replace(netloc=netloc).geturl(),
        host=host,
        host_header=parts.netloc,
        address=address,
    )


async def _addresses(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S
        )
    except (OSError, TimeoutError, UnicodeError):
        return []
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        # An IPv6 scope ("fe80::1%eth0") is link-local anyway: drop it before parsing.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found
