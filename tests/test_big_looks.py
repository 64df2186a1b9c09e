"""Big looks in flight do not stall other RPCs or blow the gateway's memory: a real gateway over
gRPC, real Triton. Looks are decoded off the event loop, reduced early (JPEG draft mode) and
at most LOOK_DECODES_AT_ONCE at a time (docs/ARCHITECTURE.md, "Look images")."""

import io
import multiprocessing
import statistics
import threading
import time

import grpc
from PIL import Image

from clients.looks import compose_look
from gateway.api import looksync_pb2 as pb
from gateway.api import looksync_pb2_grpc as pb_grpc
from gateway.look.querygen import LOOK_DECODES_AT_ONCE
from tests.conftest import llm_env, start_gateway, wait_for
from tests.llm_stub import Reply, ScriptedLLM

SIDE = 5000  # 25 MP
# docs/ARCHITECTURE.md, "Look images": over idle, 20 MiB per look in flight plus, per decode
# slot, 4 B x MAX_LOOK_PIXELS (30 M).
LOOKS_IN_FLIGHT = 4


def _big_look(catalog, products) -> bytes:
    small = Image.open(io.BytesIO(compose_look({"upper": catalog.parent / products[3].image_url})))
    buf = io.BytesIO()
    small.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _rss_mb(pid: int, field: str) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _p50_search_text(client, n: int = 40, until=lambda: True) -> float:
    """Median latency of at least n sequential SearchText calls, going on until `until()`."""
    took = []
    deadline = time.monotonic() + 120
    while len(took) < n or not until():
        assert time.monotonic() < deadline, "the load never reached its target"
        start = time.perf_counter()
        client.search_text(f"striped shirt {len(took) % 4}", k=5, timeout_s=30)
        took.append(time.perf_counter() - start)
    return statistics.median(took)


def _send_looks(address: str, look: bytes, stop, sent) -> None:
    """One client process: a big look, cancelled after a moment (it was uploaded and decoded,
    and waits in the held LLM), and sent again, until stopped. A process of its own so that
    the measuring thread does not share an interpreter lock with four senders."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 32 << 20)])
    stub = pb_grpc.LookSearchStub(channel)
    request = pb.SearchLookRequest(image=look, k_per_layer=3)
    while not stop.is_set():
        call = stub.SearchLook.future(request, timeout=60)
        with sent.get_lock():
            sent.value += 1
        stop.wait(0.6)  # load generation pacing, not ordering: the test counts decodes itself
        call.cancel()
    channel.close()


def test_search_text_keeps_its_latency_while_big_looks_are_in_flight(
    triton, indexed, catalog, products, tmp_path
):
    # The LLM holds every look at query generation, so the looks' cost is upload, decode and
    # reduction only (what used to block the event loop), with no Triton work of their own.
    release = threading.Event()
    llm = ScriptedLLM(script=lambda kind, body: Reply(status=500, hold=release)).start()
    env = llm_env(triton, indexed, llm)
    gw = start_gateway(env, tmp_path / "gateway.log")
    look = _big_look(catalog, products)
    assert len(look) < 16 << 20
    ctx = multiprocessing.get_context("spawn")
    stop, sent = ctx.Event(), ctx.Value("i", 0)
    senders = [
        ctx.Process(target=_send_looks, args=(gw.address, look, stop, sent)) for _ in range(LOOKS_IN_FLIGHT)
    ]
    try:
        with gw.client() as client:
            _p50_search_text(client, 10)  # warm up
            idle = _p50_search_text(client)
            base_rss = _rss_mb(gw.process.pid, "VmRSS")
            for p in senders:
                p.start()
            wait_for(lambda: len(llm.requests) >= 8, what="big looks to be decoded and reach the LLM")
            before = len(llm.requests)
            # Measured across at least 12 big looks decoded meanwhile.
            loaded = _p50_search_text(client, 60, until=lambda: len(llm.requests) - before >= 12)
            decoded = len(llm.requests) - before
        peak = _rss_mb(gw.process.pid, "VmHWM")
    finally:
        stop.set()
        for p in senders:
            p.join(30)
        release.set()
        gw.stop()
        llm.stop()
    print(f"idle p50 {idle * 1000:.1f} ms, loaded p50 {loaded * 1000:.1f} ms, {sent.value} looks sent, "
          f"{decoded} decoded while measuring, RSS {base_rss:.0f} MB -> peak {peak:.0f} MB")  # fmt: skip
    assert decoded >= 12
    assert loaded <= 3 * idle, (idle, loaded)
    bound = LOOKS_IN_FLIGHT * 20 + LOOK_DECODES_AT_ONCE * 4 * 30_000_000 / (1 << 20)
    assert peak - base_rss < bound, (base_rss, peak, bound)


def test_a_look_whose_deadline_passes_while_it_queues_is_never_decoded(monkeypatch):
    """Decode slots are few (LOOK_DECODES_AT_ONCE): a request whose deadline passes while it
    waits for one fails then, instead of decoding a look nobody waits for and delaying those
    queued behind it."""
    import asyncio

    from gateway.errors import DeadlineExceeded
    from gateway.look import querygen
    from gateway.search import Deadline

    decoded = []
    real = querygen.decode_look
    monkeypatch.setattr(querygen, "decode_look", lambda data, px: decoded.append(1) or real(data, px))
    look = io.BytesIO()
    Image.new("RGB", (64, 128), (20, 90, 200)).save(look, "PNG")

    async def run():
        slots = querygen._decode_slots.setdefault(
            asyncio.get_running_loop(), asyncio.Semaphore(LOOK_DECODES_AT_ONCE)
        )
        for _ in range(LOOK_DECODES_AT_ONCE):  # every slot busy with other looks
            await slots.acquire()
        started = time.monotonic()
        try:
            await querygen.decode_look_async(look.getvalue(), 10**7, Deadline.after(0.3))
        except DeadlineExceeded:
            waited = time.monotonic() - started
        else:
            raise AssertionError("decoded after its deadline")
        for _ in range(LOOK_DECODES_AT_ONCE):
            slots.release()
        assert not decoded
        img = await querygen.decode_look_async(look.getvalue(), 10**7, Deadline.after(30))
        return waited, img

    waited, img = asyncio.run(run())
    assert 0.29 <= waited < 10  # failed at its deadline, not after the slots freed
    assert img.size == (64, 128) and decoded == [1]
