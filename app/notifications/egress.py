"""Where webhooks may go: the SSRF guard of notification endpoints.

A notification URL is typed by an operator or a tenant's admin, and the worker POSTs to it from
inside the deployment's network. Without a guard, a URL naming 169.254.169.254 (the cloud
metadata service), 127.0.0.1 or a private address would make the worker reach what only it
can reach. So:

- at creation (`WebhookPolicy.check_url`): an http(s) URL with a host, https only when
  SELFHEAL_ENV=prod, and its host (a literal address, or every address its name resolves to)
  must be a public unicast address;
- at each connection (`WebhookTransport`): the name is resolved again, every address is
  checked again, and the socket is opened to the address that was checked, never to the name.
  A name that resolved to a public address at creation and to 127.0.0.1 now (DNS rebinding)
  is refused before any connection. The Host header and the TLS server name stay the URL's
  host, so certificates are verified as usual;
- SELFHEAL_WEBHOOK_ALLOW lists what is allowed anyway: networks (`10.1.2.0/24`, `::1`) and
  host names (`hooks.internal`, `*.corp.example`, matched on the URL's host, whatever they
  resolve to);
- redirects are never followed (app/notifications/delivery.py), and proxies from the
  environment are not used (a proxy would resolve the name itself).

Refused: loopback, link-local (169.254.0.0/16, fe80::/10), private (10/8, 172.16/12,
192.168/16, fc00::/7, 100.64/10), multicast, unspecified, reserved and every other address
that is not globally routable, also when written as an IPv4-mapped (::ffff:a.b.c.d), 6to4,
Teredo or NAT64 (64:ff9b::/96) IPv6 address."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from app.core.errors import Invalid
from app.core.settings import IPNetwork, Settings, webhook_allow_entries

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses the name resolves to (text form).
Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_URL_CHARS = 2048
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class DestinationRefused(Exception):
    """A webhook's destination is not allowed (found when connecting): no connection was made."""


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system's resolver gives for `host` (what a socket would use)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def blocked_reason(address: IPAddress) -> str | None:
    """Why a webhook may not go to `address`, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: IPAddress | None = address.ipv4_mapped or address.sixtofour
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            inner = blocked_reason(embedded)
            if inner is not None:
                return f"{inner} (as {address})"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (where cloud metadata services live)"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address.is_private:
        return "private"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local (fec0::/10, private in all but name)"
    if address.is_reserved:
        return "reserved"
    if not address.is_global:
        return "not globally routable"
    return None


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """What webhook URLs may name, and where their connections may go."""

    require_https: bool = False
    allow_networks: tuple[IPNetwork, ...] = ()
    allow_hosts: frozenset[str] = frozenset()
    resolver: Resolver = field(default=system_resolver, compare=False)
    resolve_timeout_s: float = 5.0

    @classmethod
    def from_settings(
        cls, settings: Settings, *, resolver: Resolver | None = None
    ) -> WebhookPolicy:
        networks, hosts = webhook_allow_entries(settings.webhook_allow)
        return cls(
            require_https=settings.env == "prod",
            allow_networks=networks,
            allow_hosts=hosts,
            resolver=resolver or system_resolver,
            resolve_timeout_s=min(5.0, settings.webhook_timeout_s),
        )

    def host_allowed(self, host: str) -> bool:
        """The URL's host is allow-listed by name (`hooks.internal`, `*.corp.example`)."""
        name = host.lower().rstrip(".")
        if name in self.allow_hosts:
            return True
        return any(
            entry.startswith("*.") and name.endswith(entry[1:]) for entry in self.allow_hosts
        )

    def address_problem(self, address: IPAddress) -> str | None:
        """Why a connection to `address` is refused, or None (allowed)."""
        candidates: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            candidates.append(address.ipv4_mapped)
        for candidate in candidates:
            if any(
                candidate.version == network.version and candidate in network
                for network in self.allow_networks
            ):
                return None
        return blocked_reason(address)

    async def checked_addresses(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for `host`: a literal address as it is, a name
        resolved, every address checked. DestinationRefused if any is refused (a name with
        one bad address is not half trusted); httpcore.ConnectError/ConnectTimeout if it
        does not resolve (a passing DNS failure: the delivery is retried)."""
        literal = _literal(host)
        if literal is not None:
            found = [literal]
        else:
            try:
                async with asyncio.timeout(self.resolve_timeout_s):
                    names = await self.resolver(host, port)
            except TimeoutError:
                raise httpcore.ConnectTimeout(
                    f"{host} did not resolve within {self.resolve_timeout_s:g} s"
                ) from None
            except OSError as exc:
                raise httpcore.ConnectError(f"{host} does not resolve ({exc})") from None
            found = [ipaddress.ip_address(name.split("%", 1)[0]) for name in names]
            if not found:
                raise httpcore.ConnectError(f"{host} does not resolve")
        for address in found:
            problem = self.address_problem(address)
            if problem is not None:
                shown = host if literal is not None else f"{host} ({address})"
                raise DestinationRefused(
                    f"{shown} is a {problem} address; webhooks go to public addresses only"
                    " (SELFHEAL_WEBHOOK_ALLOW lists the exceptions)"
                )
        return [str(address) for address in found]

    def check_url_syntax(self, url: str) -> httpx.URL:
        """An absolute http(s) URL with a host (https when SELFHEAL_ENV=prod), and, when the
        host is a literal address, an allowed one. Invalid (field `url`) otherwise."""
        if len(url) > MAX_URL_CHARS or any(ch.isspace() for ch in url):
            raise Invalid("the URL must be at most 2048 characters, without spaces", field="url")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise Invalid(f"{url!r} is not a valid URL ({exc})", field="url") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise Invalid(f"{url!r} is not an http:// or https:// URL with a host", field="url")
        if self.require_https and parsed.scheme != "https":
            raise Invalid(
                f"{url!r}: notification URLs must be https:// (SELFHEAL_ENV=prod)", field="url"
            )
        if parsed.userinfo:
            raise Invalid(f"{url!r}: credentials in the URL are not accepted", field="url")
        literal = _literal(parsed.host)
        if literal is not None and not self.host_allowed(parsed.host):
            problem = self.address_problem(literal)
            if problem is not None:
                raise Invalid(_refusal(url, f"{parsed.host} is a {problem} address"), field="url")
        return parsed

    async def check_url(self, url: str) -> str:
        """`check_url_syntax`, then the host's name resolved and every address checked."""
        parsed = self.check_url_syntax(url)
        if self.host_allowed(parsed.host) or _literal(parsed.host) is not None:
            return url
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            await self.checked_addresses(parsed.host, port)
        except DestinationRefused as exc:
            raise Invalid(_refusal(url, str(exc).split(";")[0]), field="url") from None
        except httpcore.ConnectTimeout:
            raise Invalid(
                f"{url!r}: {parsed.host} did not resolve within {self.resolve_timeout_s:g} s"
                " (DNS unavailable?); retry",
                field="url",
            ) from None
        except httpcore.ConnectError:
            raise Invalid(
                f"{url!r}: the host {parsed.host} does not resolve", field="url"
            ) from None
        return url


def _refusal(url: str, why: str) -> str:
    return (
        f"{url!r} is refused: {why}. Webhooks go to public addresses only; allow an internal"
        " endpoint with SELFHEAL_WEBHOOK_ALLOW (networks or host names)"
    )


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the policy in front: `connect_tcp` gets the URL's host,
    resolves and checks it, and opens the socket to a checked address. TLS (`start_tls`, with
    the URL's host as server name) and everything else is the wrapped backend's."""

    def __init__(self, policy: WebhookPolicy, inner: httpcore.AsyncNetworkBackend | None = None):
        self._policy = policy
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self._policy.host_allowed(host):
            addresses = [host]
        else:
            addresses = await self._policy.checked_addresses(host, port)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused("webhooks do not go to unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class WebhookTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with GuardedBackend under its connection pool, and no proxy from the
    environment. httpx does not take a network backend; httpcore's pool does, so the pool
    httpx built is replaced by the same pool over the guard (tests/test_notifications.py
    proves a rebinding name gets no connection: it would fail if this stopped holding)."""

    def __init__(
        self, policy: WebhookPolicy, *, limits: httpx.Limits, verify: ssl.SSLContext | bool = True
    ):
        super().__init__(trust_env=False, limits=limits, verify=verify)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )


@dataclass(frozen=True, slots=True)
class WebhookClient:
    """The only HTTP client webhooks are sent with (`deliver_due` takes nothing else): httpx
    over WebhookTransport, never following redirects."""

    http: httpx.AsyncClient
    policy: WebhookPolicy

    async def aclose(self) -> None:
        await self.http.aclose()


def webhook_client(
    policy: WebhookPolicy,
    *,
    max_connections: int = 100,
    verify: ssl.SSLContext | bool = True,
) -> WebhookClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=20)
    http = httpx.AsyncClient(
        transport=WebhookTransport(policy, limits=limits, verify=verify),
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(10.0, connect=3.0),
    )
    return WebhookClient(http, policy)
