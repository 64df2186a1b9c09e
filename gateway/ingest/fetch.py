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
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from export.triton.preprocess import InvalidImage, decode_image

FETCHES_AT_ONCE = 16
_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its semaphore


async def _in_daemon_thread(fn, *args):
    """Run a blocking fetch in a daemon thread of its own. Not the event loop's default
    executor: slow vendor hosts hold a thread until their deadline, and asyncio resolves host
    names there (a Redis reconnect would wait behind them). Not a ThreadPoolExecutor either:
    its threads are joined at exit, so a SIGTERM'd worker would wait for every fetch."""
    loop = asyncio.get_running_loop()
    slots = _slots.setdefault(loop, asyncio.Semaphore(FETCHES_AT_ONCE))
    async with slots:
        done = loop.create_future()

        def settle(result, error):
            if not done.done():
                done.set_exception(error) if error is not None else done.set_result(result)

        def run():
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop is gone (the worker exited): nobody waits for it
                pass

        threading.Thread(target=run, name="fetch", daemon=True).start()
        return await done


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
    # Local image paths (a single-box catalog): refused unless under this directory. Vendor
    # feeds must never make a worker read the host's files.
    local_dir: Path | None = None

    @classmethod
    def from_settings(cls, s, **overrides) -> FetchPolicy:
        """The policy the LOOKSYNC_FETCH_* settings describe (ingest and match workers)."""
        hosts = tuple(h.strip().lower() for h in s.fetch_allowed_hosts.split(",") if h.strip())
        fields = dict(
            max_bytes=s.fetch_max_bytes,
            timeout_s=s.fetch_timeout_s,
            allowed_hosts=hosts,
            allow_private=s.fetch_allow_private,
            allow_loopback=s.fetch_allow_loopback,
            local_dir=s.fetch_local_dir,
        )
        return cls(**{**fields, **overrides})


_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # deprecated relay tunnels into any IPv4 address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # embeds an IPv4 address in its last 32 bits


def _check_address(ip: str, policy: FetchPolicy) -> None:
    """Only globally routable addresses, unless loopback or private networks are allowed.
    `is_global` rather than a list of private ranges: it also refuses carrier-grade NAT
    (100.64.0.0/10, where some clouds put their metadata service), benchmarking, reserved and
    documentation ranges. IPv6 forms that carry an IPv4 address are judged by that address."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr in _NAT64:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        elif addr in _SIX_TO_FOUR:
            raise FetchError("forbidden_address", f"{ip} is a 6to4 address (it can reach any IPv4 host)")
    if addr.is_loopback:
        if not policy.allow_loopback:
            raise FetchError("forbidden_address", f"{ip} is a loopback address")
        return
    # is_global alone lets some IPv6 through (site-local fec0::/10, multicast, IPv4-compatible
    # ::/96, which is reserved): refuse those explicitly.
    odd = addr.is_multicast or addr.is_reserved or getattr(addr, "is_site_local", False)
    if (odd or not addr.is_global) and not policy.allow_private:
        raise FetchError("forbidden_address", f"{ip} is not a globally routable address")


def resolve(url: str, policy: FetchPolicy) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, path, checked ip) or FetchError; connects to nothing."""
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
        port = parts.port  # a bad port ("99999", "x") raises here
    except ValueError as exc:  # malformed IPv6 brackets, port out of range, ...
        raise FetchError("bad_url", f"{exc} in {url[:100]!r}") from None
    if scheme not in ("http", "https"):
        raise FetchError("forbidden_scheme", f"{scheme or 'no'} scheme in {url[:100]!r}")
    if not host:
        raise FetchError("bad_url", f"no host in {url[:100]!r}")
    if policy.allowed_hosts and host.lower() not in policy.allowed_hosts:
        raise FetchError("forbidden_host", f"{host} is not in the allowed hosts")
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError("dns", f"{host}: {exc}") from None
    except UnicodeError as exc:  # a label over 63 characters, an IDNA-invalid name
        raise FetchError("bad_url", f"host {host[:80]!r}: {exc}") from None
    ips = sorted({info[4][0] for info in infos})
    for ip in ips:  # every address must pass: any one of them could be the one connected to
        _check_address(ip, policy)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port, path, ips[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, ip: str, host: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def read_local(url: str, policy: FetchPolicy) -> bytes:
    """A local path or file:// URL, allowed only inside `policy.local_dir` (links resolved
    first, so a link cannot lead out of it)."""
    if policy.local_dir is None:
        raise FetchError(
            "forbidden_scheme",
            f"local path {url[:100]!r}: events may name local files only under "
            "LOOKSYNC_FETCH_LOCAL_DIR, which is not set",
        )
    raw = url[len("file://") :] if url.startswith("file://") else url
    root = Path(policy.local_dir).resolve()
    try:
        path = (root / raw).resolve()  # an absolute raw path replaces root here
    except (OSError, ValueError) as exc:
        raise FetchError("bad_url", f"{raw[:100]!r}: {exc}") from None
    if not path.is_relative_to(root):
        raise FetchError("forbidden_path", f"{raw[:100]!r} is outside {root}")
    try:
        with open(path, "rb") as fh:
            data = fh.read(policy.max_bytes + 1)
    except OSError as exc:
        raise FetchError("not_found", f"{raw[:100]!r}: {exc.strerror}") from None
    if len(data) > policy.max_bytes:
        raise FetchError("too_large", f"more than {policy.max_bytes} bytes")
    try:
        decode_image(data, policy.max_pixels)
    except InvalidImage as exc:
        raise FetchError("not_image", str(exc)) from None
    return data


def fetch_sync(url: str, policy: FetchPolicy) -> bytes:
    """The image bytes, or FetchError. One deadline (`policy.timeout_s`) covers the whole
    fetch: every hop's connect, each read of the body (a host trickling one byte at a time
    is cut off at the deadline, not kept alive by it)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url.split("/", 1)[0] else ""
    if scheme in ("", "file"):
        return read_local(url, policy)
    deadline = time.monotonic() + policy.timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timeout", f"no complete image within {policy.timeout_s:g}s")
        return remaining

    for _ in range(policy.max_redirects + 1):
        scheme, host, port, path, ip = resolve(url, policy)
        if scheme == "https":
            conn = _PinnedHTTPS(ip, host, port, left())
        else:
            conn = http.client.HTTPConnection(ip, port, timeout=left())
        try:
            conn.request(
                "GET", path, headers={"Host": host, "User-Agent": "looksync-ingest/1", "Accept": "image/*"}
            )
            sock = conn.sock
            sock.settimeout(left())
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise FetchError("bad_redirect", f"HTTP {resp.status} without Location")
                try:
                    url = urljoin(url, location)
                except ValueError as exc:
                    raise FetchError("bad_redirect", f"Location {location[:100]!r}: {exc}") from None
                continue
            if resp.status != 200:
                raise FetchError("http_status", f"HTTP {resp.status} from {host}")
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise FetchError("not_image", f"content type {ctype or 'missing'!r}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError("too_large", f"{length} bytes > {policy.max_bytes}")
            data = _read_body(resp, sock, policy.max_bytes, left)
        except TimeoutError:
            raise FetchError("timeout", f"{host}: no complete image within {policy.timeout_s:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError("network", f"{host}: {exc}") from None
        finally:
            conn.close()
        if not data:
            raise FetchError("not_image", "empty body")
        try:
            decode_image(data, policy.max_pixels)
        except InvalidImage as exc:
            raise FetchError("not_image", str(exc)) from None
        return data
    raise FetchError("too_many_redirects", f"more than {policy.max_redirects}")


def _read_body(resp, sock, max_bytes: int, left) -> bytes:
    """Read in chunks, re-arming the socket timeout with what is left of the deadline."""
    chunks, size = [], 0
    while not resp.isclosed():  # http.client closes it once the whole body is in
        sock.settimeout(left())
        chunk = resp.read1(64 << 10)
        if not chunk:
            if resp.length:  # the server closed before Content-Length bytes arrived
                raise FetchError("network", f"body cut off, {resp.length} bytes missing")
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            raise FetchError("too_large", f"more than {max_bytes} bytes")
    return b"".join(chunks)


async def fetch(url: str, policy: FetchPolicy) -> bytes:
    """fetch_sync in a thread; whatever goes wrong comes back as FetchError (a vendor feed
    can put anything in a URL: one bad URL must never end a worker)."""
    try:
        # The thread's own deadline cannot cover name resolution or a header line trickled a
        # byte at a time; this one covers everything (the thread is left to end on its own).
        return await asyncio.wait_for(_in_daemon_thread(fetch_sync, url, policy), policy.timeout_s + 2)
    except TimeoutError:
        raise FetchError("timeout", f"no complete image within {policy.timeout_s:g}s") from None
    except FetchError:
        raise
    except Exception as exc:
        raise FetchError("bad_url", f"{type(exc).__name__}: {exc}"[:300]) from None
