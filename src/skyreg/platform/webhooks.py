"""Webhook delivery: the `webhooks` worker that POSTs each due delivery of the outbox
(`meta/webhooks.py`) as a signed CloudEvent, and the checks that keep those POSTs off the
server's own network.

A webhook URL is chosen by a user, so the server would otherwise make requests for them to
its loopback, its private network or a cloud metadata endpoint (SSRF). `check_target` refuses
such a URL when the webhook is created, and `SafeResolver` applies the same rule to every
address the name resolves to when a delivery connects: a name that resolved to a public address
at creation and to a private one later (DNS rebinding) is refused at delivery. Redirects are
not followed, so a public target cannot bounce a delivery inward either.

The secret that signs a webhook's deliveries is sealed under the server's master key, bound to
the webhook's id (`seal_secret`, `open_secret`): the database holds only ciphertext.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from skyreg.auth.envelope import MasterKeys, SecretKeyError
from skyreg.meta.webhooks import DeliveryRecord, DueDelivery, WebhookMeta
from skyreg.services.webhooks import SECRET_CONTEXT as SECRET_CONTEXT
from skyreg.services.webhooks import open_secret as open_secret
from skyreg.services.webhooks import seal_secret as seal_secret
from skyreg.workers.base import PeriodicWorker

log = logging.getLogger("skyreg.platform.webhooks")

MAX_URL_LENGTH = 2048
MAX_ANSWER_BYTES = 64 * 1024
MAX_BACKOFF = 3600.0
DUE_BATCH = 50
USER_AGENT = "skyreg-webhooks"
CONTENT_TYPE = "application/cloudevents+json"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: IPv4 in the low 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local-use, never public
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d


# -- the secret ----------------------------------------------------------------------------------


# -- where a webhook may point -------------------------------------------------------------------


class UnsafeTarget(ValueError):
    """A webhook URL that is malformed or leads to an address the server must not call."""


def _unsafe_kind(ip: IPAddress) -> str | None:
    """Why `ip` is not a public address (None when it is)."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address are judged by that address.
        embedded: ipaddress.IPv4Address | None = None
        if ip.ipv4_mapped is not None:
            embedded = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            embedded = ip.sixtofour
        elif ip.teredo is not None:
            embedded = ip.teredo[1]
        elif ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip in _NAT64_LOCAL:
            return "a local-use NAT64 address"
        elif ip in _IPV4_COMPATIBLE and int(ip) > 1:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            kind = _unsafe_kind(embedded)
            return None if kind is None else f"{kind} (embedded in {ip})"
    for kind, flag in (
        ("an unspecified address", ip.is_unspecified),
        ("a loopback address", ip.is_loopback),
        ("a link-local address", ip.is_link_local),
        ("a multicast address", ip.is_multicast),
        ("a private address", ip.is_private),
        ("a reserved address", ip.is_reserved),
        ("not a public address", not ip.is_global),
    ):
        if flag:
            return kind
    return None


def check_address(address: str, *, host: str | None = None) -> None:
    """UnsafeTarget when `address` (an IP address, as a resolver returns it) is not public."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise UnsafeTarget(f"{address!r} is not an IP address") from None
    kind = _unsafe_kind(ip)
    if kind is not None:
        # A name's addresses are not shown: a tenant must not look up the server's internal
        # DNS through this message.
        name = f"{host} resolves to {kind}" if host and host != address else f"{ip}, {kind}"
        raise UnsafeTarget(
            f"{name}: webhooks may only call public addresses "
            "(a server operator may allow private targets)"
        )


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart: its host (brackets removed) and port."""

    url: str
    host: str
    port: int
    literal: IPAddress | None  # the host, when it is an IP address


def parse_target(url: str) -> Target:
    """`url` checked for shape: http or https, a host, no user or password, a port in 1-65535,
    at most 2048 characters. UnsafeTarget otherwise."""
    if len(url) > MAX_URL_LENGTH:
        raise UnsafeTarget(f"a webhook URL has at most {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UnsafeTarget(f"the webhook URL is malformed: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeTarget("a webhook URL starts with http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("a webhook URL may not carry a user name or password")
    host = parts.hostname
    if not host:
        raise UnsafeTarget("a webhook URL needs a host")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    elif not 1 <= port <= 65535:
        raise UnsafeTarget("a webhook URL's port is between 1 and 65535")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    return Target(url, host, port, literal)


async def check_target(url: str, allow_private: bool) -> None:
    """UnsafeTarget when `url` may not be a webhook: a malformed URL (`parse_target`), a host
    that does not resolve, or — unless `allow_private` — one of whose addresses is loopback,
    private, link-local, multicast, reserved, unspecified or otherwise not public (IPv4-mapped,
    6to4, Teredo and NAT64 forms judged by the IPv4 address they carry)."""
    target = parse_target(url)
    if target.literal is not None:
        if not allow_private:
            check_address(str(target.literal))
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UnsafeTarget(f"the webhook host {target.host} does not resolve: {e}") from None
    if not infos:
        raise UnsafeTarget(f"the webhook host {target.host} resolves to no address")
    if not allow_private:
        for info in infos:
            check_address(str(info[4][0]), host=target.host)


class SafeResolver(AbstractResolver):
    """aiohttp's threaded resolver, refusing (UnsafeTarget) a name any of whose addresses is
    not public: the `check_target` rule again at connect time, against DNS rebinding.

    aiohttp does not resolve IP literals: `WebhookSender` checks those itself.
    """

    def __init__(self, allow_private: bool = False) -> None:
        self.allow_private = allow_private
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if not self.allow_private:
            for result in results:
                check_address(result["host"], host=host)
        return results

    async def close(self) -> None:
        await self._inner.close()


# -- what is sent --------------------------------------------------------------------------------


def cloudevent(d: DeliveryRecord) -> bytes:
    """The delivery's event as a CloudEvents 1.0 structured-mode JSON document."""
    event: dict[str, object] = {
        "specversion": "1.0",
        "id": d.event_id,
        "source": d.source,
        "type": d.event_type,
        "time": d.time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "datacontenttype": "application/json",
        "data": json.loads(d.data),
    }
    if d.subject is not None:
        event["subject"] = d.subject
    return json.dumps(event, sort_keys=True, separators=(",", ":")).encode("utf-8")


def signature(secret: str, body: bytes) -> str:
    """`X-Skyreg-Signature`: "sha256=" and the hex HMAC-SHA256 of the body under the secret."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def headers(d: DeliveryRecord, secret: str, body: bytes) -> dict[str, str]:
    """The headers of a delivery's POST."""
    return {
        "Content-Type": CONTENT_TYPE,
        "User-Agent": USER_AGENT,
        "X-Skyreg-Signature": signature(secret, body),
        "X-Skyreg-Delivery": str(d.id),
        "X-Skyreg-Event": d.event_type,
    }


# -- the worker ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    delivered: bool
    status: int | None
    response: str | None
    error: str | None


@dataclass
class WebhookSender:
    """Delivers due webhook deliveries: one `step` sends each webhook's oldest due delivery
    (at most `concurrency` POSTs at once, one per webhook) and records the attempt. A 2xx
    answer delivers; any other answer, a redirect, a timeout or a refused target is retried
    after min(retry_base * 2**attempts, 3600) seconds, until `max_attempts` attempts fail it."""

    meta: WebhookMeta
    keys: Callable[[], MasterKeys]  # may block (reads a key file): called on a thread
    allow_private: bool = False
    timeout: float = 10.0
    max_attempts: int = 8
    retry_base: float = 5.0
    concurrency: int = 8
    per_org: int = 2  # deliveries of one org's webhooks in flight at once
    delivered: int = 0  # deliveries this process delivered
    failed: int = 0  # deliveries this process gave up on
    retried: int = 0  # failed attempts to be made again
    step_wait: float = 1.0  # seconds a step waits for the deliveries it started
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _gate: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    # The delivery in flight of each webhook (it may outlive the step that started it).
    _inflight: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False, repr=False)
    _org_of: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=SafeResolver(self.allow_private),
                use_dns_cache=False,  # every connection's addresses are checked afresh
                limit=self.concurrency,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                trust_env=False,  # a proxy would connect wherever it likes
            )
        return self._session

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt after `attempts` earlier failed ones and this one."""
        return float(min(self.retry_base * 2**attempts, MAX_BACKOFF))

    async def step(self) -> None:
        """Start each due delivery of a webhook that has none in flight, and wait for them at
        most `step_wait` seconds: a receiver that answers slowly (or never, until `timeout`)
        holds back its own webhook only, not the next steps of the others."""
        self._reap()
        # Webhooks with a delivery in flight are left out of the query, so hanging receivers
        # never take the places of due deliveries of others.
        due = await self.meta.read(self.meta.due, DUE_BATCH, frozenset(self._inflight))
        if not due:
            return
        keys = await asyncio.to_thread(self.keys)
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        gate = self._gate

        async def one(item: DueDelivery) -> None:
            async with gate:
                await self._deliver(keys, item)

        # An org's receivers that hang hold at most `per_org` of the `concurrency` slots.
        busy = Counter(self._org_of[hook] for hook in self._inflight)
        started = []
        for item in due:
            if busy[item.org_id] >= self.per_org:
                continue  # due again at the next step
            busy[item.org_id] += 1
            task = asyncio.create_task(one(item))
            self._inflight[item.delivery.webhook_id] = task
            self._org_of[item.delivery.webhook_id] = item.org_id
            started.append(task)
        if not started:
            return
        await asyncio.wait(started, timeout=self.step_wait)
        self._reap()

    def _reap(self) -> None:
        """Forget finished deliveries; raise the first one's error, once all are forgotten (a
        failed write must not leave the others in the in-flight table)."""
        error: BaseException | None = None
        for hook_id, task in list(self._inflight.items()):
            if task.done():
                del self._inflight[hook_id]
                self._org_of.pop(hook_id, None)
                if not task.cancelled() and task.exception() is not None and error is None:
                    error = task.exception()
        if error is not None:
            raise error

    async def _deliver(self, keys: MasterKeys, item: DueDelivery) -> None:
        d = item.delivery
        started = time.monotonic()
        outcome = await self._send(keys, item)
        latency_ms = round((time.monotonic() - started) * 1000)
        retry_at: datetime | None = None
        if outcome.delivered:
            self.delivered += 1
        elif d.attempts + 1 >= self.max_attempts:
            self.failed += 1
        else:
            self.retried += 1
            retry_at = datetime.now(UTC) + timedelta(seconds=self.backoff(d.attempts))
        await self.meta.run(
            self.meta.attempted,
            d.id,
            delivered=outcome.delivered,
            status=outcome.status,
            latency_ms=latency_ms,
            response=outcome.response,
            error=outcome.error,
            retry_at=retry_at,
        )

    async def _send(self, keys: MasterKeys, item: DueDelivery) -> _Outcome:
        d = item.delivery
        try:
            target = parse_target(item.url)
            if target.literal is not None and not self.allow_private:
                check_address(str(target.literal))  # aiohttp resolves no literal: check it here
            secret = open_secret(keys, d.webhook_id, item.key_id, item.sealed_secret)
            body = cloudevent(d)
            async with self._client().post(
                item.url, data=body, headers=headers(d, secret, body), allow_redirects=False
            ) as resp:
                answer = await _read_some(resp, MAX_ANSWER_BYTES)
                text = answer.decode("utf-8", errors="replace") or None
                if 200 <= resp.status < 300:
                    return _Outcome(True, resp.status, text, None)
                error = f"HTTP {resp.status}"
                if 300 <= resp.status < 400:
                    error += " (redirects are not followed)"
                return _Outcome(False, resp.status, text, error)
        except (UnsafeTarget, SecretKeyError) as e:
            return _Outcome(False, None, None, str(e))
        except TimeoutError:
            return _Outcome(False, None, None, f"no answer within {self.timeout:g}s")
        except Exception as e:  # whatever went wrong is the attempt's result, not the step's
            cause = e.__cause__ if isinstance(e.__cause__, UnsafeTarget) else e
            return _Outcome(False, None, None, f"{type(cause).__name__}: {cause}")

    def worker(self, interval: float = 1.0) -> PeriodicWorker:
        """The `webhooks` worker: a `step` every `interval` seconds."""
        return PeriodicWorker("webhooks", interval, self.step, logger=log)

    async def aclose(self) -> None:
        """Stop the deliveries in flight (each stays pending: it is sent again, at least once)
        and close the HTTP client (after the worker stopped)."""
        tasks = list(self._inflight.values())
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def metrics(self) -> str:
        """The `skyreg_webhook_*` Prometheus section: this process's deliveries."""
        return (
            "# HELP skyreg_webhook_deliveries_delivered_total Webhook deliveries this process "
            "delivered.\n"
            "# TYPE skyreg_webhook_deliveries_delivered_total counter\n"
            f"skyreg_webhook_deliveries_delivered_total {self.delivered}\n"
            "# HELP skyreg_webhook_deliveries_failed_total Webhook deliveries this process gave "
            "up on after their last attempt.\n"
            "# TYPE skyreg_webhook_deliveries_failed_total counter\n"
            f"skyreg_webhook_deliveries_failed_total {self.failed}\n"
            "# HELP skyreg_webhook_attempts_retried_total Failed webhook delivery attempts this "
            "process will make again.\n"
            "# TYPE skyreg_webhook_attempts_retried_total counter\n"
            f"skyreg_webhook_attempts_retried_total {self.retried}\n"
        )


async def _read_some(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the answer's body (the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
