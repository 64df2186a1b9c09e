"""Image fetching for untrusted vendor feeds.

Only http(s); every hop (redirects included) is resolved and checked before any connection:
loopback, private, link-local, reserved and multicast addresses are refused unless allowed,
and the connection goes to the address that was checked (no second DNS lookup to rebind).
Size, time, content type and decodability are all enforced.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from export.triton.preprocess import InvalidImage, decode_image


class FetchError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int = 10 << 20
    timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_hosts: tuple[str, ...] = ()  # empty: any public host
    allow_private: bool = False
    allow_loopback: bool = False  # for tests and single-box setups serving images locally
    max_pixels: int = 40_000_000


def _check_address(ip: str, policy: FetchPolicy) -> None:
    addr = ipaddress.ip_address(ip)
    if addr.is_loopback:
        if not policy.allow_loopback:
            raise FetchError("forbidden_address", f"{ip} is a loopback address")
        return
    if (
        addr.is_private or addr.is_link_local or addr.is_reserved or addr.is_multicast or addr.is_unspecified
    ) and not policy.allow_private:
        raise FetchError("forbidden_address", f"{ip} is a private, link-local or reserved address")


def resolve(url: str, policy: FetchPolicy) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path, checked ip) or FetchError; connects to nothing."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError("forbidden_scheme", f"{parts.scheme or 'no'} scheme in {url[:100]!r}")
    host = parts.hostname
    if not host:
        raise FetchError("bad_url", f"no host in {url[:100]!r}")
    if policy.allowed_hosts and host.lower() not in policy.allowed_hosts:
        raise FetchError("forbidden_host", f"{host} is not in the allowed hosts")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError("dns", f"{host}: {exc}") from None
    ips = sorted({info[4][0] for info in infos})
    for ip in ips:  # every address must pass: any one of them could be the one connected to
        _check_address(ip, policy)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, path, ips[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, ip: str, host: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_sync(url: str, policy: FetchPolicy) -> bytes:
    for _ in range(policy.max_redirects + 1):
        scheme, host, port, path, ip = resolve(url, policy)
        if scheme == "https":
            conn = _PinnedHTTPS(ip, host, port, policy.timeout_s)
        else:
            conn = http.client.HTTPConnection(ip, port, timeout=policy.timeout_s)
        try:
            conn.request(
                "GET", path, headers={"Host": host, "User-Agent": "looksync-ingest/1", "Accept": "image/*"}
            )
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise FetchError("bad_redirect", f"HTTP {resp.status} without Location")
                url = urljoin(url, location)
                continue
            if resp.status != 200:
                raise FetchError("http_status", f"HTTP {resp.status} from {host}")
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise FetchError("not_image", f"content type {ctype or 'missing'!r}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError("too_large", f"{length} bytes > {policy.max_bytes}")
            data = resp.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                raise FetchError("too_large", f"more than {policy.max_bytes} bytes")
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError("network", f"{host}: {exc}") from None
        finally:
            conn.close()
        try:
            decode_image(data, policy.max_pixels)
        except InvalidImage as exc:
            raise FetchError("not_image", str(exc)) from None
        return data
    raise FetchError("too_many_redirects", f"more than {policy.max_redirects}")


async def fetch(url: str, policy: FetchPolicy) -> bytes:
    return await asyncio.to_thread(fetch_sync, url, policy)
