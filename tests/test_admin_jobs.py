"""Model activation over the Admin API as a background job: a real gateway over gRPC, a real
Triton serving two versions, real Redis holding the job and the lock. The rebuild is held
mid-way on an image the test releases (`/held/`), so every state is reached by event."""

import asyncio
import json
import os
import signal

import grpc
import pytest
import redis as redis_sync

from clients.client import LookSyncClient
from tests.conftest import (
    HELD_REQUESTS,
    looksync,
    looksync_env,
    start_gateway,
    start_triton,
    wait_for,
)
from tests.test_swap import _serve_only, swap_repo  # noqa: F401  (fixture)

TOKEN = "jobs-admin-token"
HELD_AT = 100  # the catalog line whose image is held: the rebuild stops there


@pytest.fixture(scope="module")
def jobs_triton(swap_repo, tmp_path_factory):  # noqa: F811
    server = start_triton(swap_repo, tmp_path_factory.mktemp("jobs_triton"))
    yield server
    server.stop()


@pytest.fixture()
def world(jobs_triton, swap_repo, catalog, image_server, redis_url, tmp_path):  # noqa: F811
    """v1 serving, v2 exported; a catalog in the gateway's catalog directory whose images come
    over HTTP, one of them held; a gateway with Admin allowed on loopback plaintext."""
    url = f"127.0.0.1:{jobs_triton.grpc_port}"
    asyncio.run(_serve_only(url, swap_repo, [1]))
    redis_sync.Redis.from_url(redis_url).flushdb()
    catalogs = tmp_path / "catalogs"
    catalogs.mkdir()
    lines = [json.loads(line) for line in catalog.read_text().splitlines() if line.strip()]
    for n, rec in enumerate(lines):
        rec["image_url"] = f"{image_server}/{'held/' if n == HELD_AT else ''}{rec['image_url']}"
    (catalogs / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (catalogs / "short.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:50]))
    # The same 50, one of whose images is not on the server (HTTP 404).
    broken = [dict(r) for r in lines[:50]]
    broken[7]["image_url"] = f"{image_server}/missing/{broken[7]['id']}.jpg"
    (catalogs / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
    env = looksync_env(
        jobs_triton,
        tmp_path / "data",
        LOOKSYNC_REDIS_URL=redis_url,
        LOOKSYNC_ADMIN_TOKEN=TOKEN,
        LOOKSYNC_ADMIN_ALLOW_PLAINTEXT="true",
        LOOKSYNC_ADMIN_CATALOG_DIR=str(catalogs),
        # Short, so that a killed gateway's lock lapses soon; a starved machine has delayed a
        # heartbeat (every TTL/3) past 5 s, letting another gateway take the lock mid-job.
        LOOKSYNC_SWAP_LOCK_TTL_S="15",
        # The held image stays in flight while the test starts a second gateway; on a loaded
        # machine that outlasts the default 10 s, and a timed-out fetch would drop its product.
        LOOKSYNC_FETCH_TIMEOUT_S="120",
    )
    indexed = looksync("index", str(catalog), "--quiet", "--version", "1", env=env)
    assert indexed.returncode == 0, indexed.stderr
    gateways = []

    def gateway(name="gateway"):
        gw = start_gateway(env, tmp_path / f"{name}.log")
        gateways.append(gw)
        return gw, LookSyncClient(gw.address, admin_token=TOKEN, timeout_s=30)

    gateway.env, gateway.catalogs = env, catalogs  # for the CLI's own activation path
    yield gateway, url, len(lines)
    for gw in gateways:
        gw.stop()


def _state(client):
    status = client.model_status()
    return {
        "alias": status.alias_target,
        "loaded": list(status.loaded_versions),
        "written": sorted(i.name for i in status.indexes if i.written),
        "indexes": sorted(i.name for i in status.indexes),
        "job": (status.job.state, status.job.stage) if status.HasField("job") else None,
    }


def _reindexing(client, job_id):
    """Until the rebuild is stopped on the held image; the job then."""
    seen = len(HELD_REQUESTS)
    job = wait_for(
        lambda: (j := client.get_job(job_id)).stage == "reindex" and len(HELD_REQUESTS) > seen and j,
        what="the rebuild to reach the held image",
    )
    return job


def _held_activation(client):
    """The state before, and an activation of v2 started and stopped on the held image."""
    before = _state(client)
    started = client.activate_model(2, "catalog.jsonl", grace_s=0.5, force=True)
    _reindexing(client, started.job_id)
    return before, started


def _refused(call, code, needle):
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details(), err.value.details()


def test_activation_is_a_job_one_at_a_time_with_progress(world, held_images, redis_url):
    gateway, _, total = world
    gw, client = gateway()
    before = _state(client)
    assert before == {
        "alias": "products-clip-v1",
        "loaded": [1],
        "written": [],
        "indexes": ["products-clip-v1"],
        "job": None,
    }
    started = client.activate_model(2, "catalog.jsonl", grace_s=0.5, force=True, timeout_s=10)
    assert started.job_id and started.job.state == "running"
    _reindexing(client, started.job_id)
    # Progress: the batches before the held image are written and reported (saves are
    # throttled, so wait for them); the rest is not.
    job = wait_for(
        lambda: (j := client.get_job(started.job_id)).total == total and j.done >= 32 and j,
        what="the rebuild's progress",
    )
    assert job.done < total

    # One activation at a time, from any gateway.
    _, other = gateway("other")
    for c in (client, other):
        _refused(
            lambda c=c: c.activate_model(2, "catalog.jsonl", force=True),
            grpc.StatusCode.FAILED_PRECONDITION,
            started.job_id,
        )
    # The gateway running the job refuses another even while its lock has lapsed (a late
    # heartbeat on a starved machine): the Redis lock is for the other processes.
    lock = "looksync:swap-lock:products"
    r = redis_sync.Redis.from_url(redis_url)
    r.delete(lock)
    _refused(
        lambda: client.activate_model(2, "catalog.jsonl", force=True),
        grpc.StatusCode.FAILED_PRECONDITION,
        started.job_id,
    )
    # Its next heartbeat takes the lock again.
    wait_for(lambda: r.get(lock) == started.job_id.encode(), what="the heartbeat to retake the lock")
    seen = _state(other)
    assert seen["job"] == ("running", "reindex")
    assert seen["loaded"] == [1, 2] and seen["written"] == ["products-clip-v2"]

    held_images.set()
    done = client.wait_job(started.job_id, poll_s=0.2, timeout_s=300)
    assert done.state == "succeeded", done.error
    assert done.result.space.version == 2 and done.result.products == total
    assert any("alias products -> products-clip-v2" in s for s in done.steps), done.steps
    after = _state(other)
    assert after["alias"] == "products-clip-v2" and after["loaded"] == [2]
    assert after["job"] == ("succeeded", "done")
    assert client.search_text("dress", k=1).space.version == 2
    # The lock is free again: the next activation may start (and fail: v2 already serves).
    again = client.activate_model(2, "catalog.jsonl", force=True)
    failed = client.wait_job(again.job_id, poll_s=0.2, timeout_s=120)
    assert failed.state == "failed" and "already the serving space" in failed.error


def test_catalog_path_is_confined_and_arguments_checked(world, tmp_path):
    gateway, _, _ = world
    _, client = gateway()
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("{}\n")
    (tmp_path / "catalogs" / "link.jsonl").symlink_to(outside)
    for path in (str(outside), "../elsewhere.jsonl", "link.jsonl", "/etc/passwd"):
        _refused(
            lambda p=path: client.activate_model(2, p, force=True),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside the catalog directory",
        )
    _refused(
        lambda: client.activate_model(2, "missing.jsonl"), grpc.StatusCode.INVALID_ARGUMENT, "not a file"
    )
    _refused(lambda: client.activate_model(2, ""), grpc.StatusCode.INVALID_ARGUMENT, "catalog_path")
    _refused(lambda: client.activate_model(0, "catalog.jsonl"), grpc.StatusCode.INVALID_ARGUMENT, "version")
    _refused(
        lambda: client.activate_model(7, "catalog.jsonl"), grpc.StatusCode.FAILED_PRECONDITION, "not exported"
    )
    _refused(lambda: client.get_job("nope"), grpc.StatusCode.INVALID_ARGUMENT, "no job")
    assert _state(client)["job"] is None  # nothing was started
    # The token is still required.
    anonymous = LookSyncClient(client.address, admin_token="wrong")
    _refused(anonymous.model_status, grpc.StatusCode.PERMISSION_DENIED, "not valid")


def test_a_failed_activation_rolls_back(world):
    gateway, url, _ = world
    _, client = gateway()
    before = _state(client)
    # 50 products against 200 in the serving index: validation refuses the switch.
    started = client.activate_model(2, "short.jsonl", grace_s=0.5)
    job = client.wait_job(started.job_id, poll_s=0.2, timeout_s=300)
    assert job.state == "failed" and "document counts differ" in job.error
    assert any(s.startswith("rolled back") for s in job.steps)
    assert _state(client) == {**before, "job": ("failed", "validate")}


def test_a_forced_activation_reports_the_products_it_could_not_embed(world):
    gateway, _, _ = world
    _, client = gateway()
    started = client.activate_model(2, "broken.jsonl", grace_s=0.5, force=True)
    job = client.wait_job(started.job_id, poll_s=0.2, timeout_s=300)
    assert job.state == "succeeded", job.error
    assert (job.result.products, job.result.failed) == (49, 1)
    assert any("1 failed" in s for s in job.steps), job.steps
    # Overridden, and said so: 49 products now serve where 200 did.
    assert any("overridden: document counts differ" in s for s in job.steps), job.steps
    assert client.search_text("dress", k=1).space.version == 2


def test_the_clis_activation_without_catch_up_rolls_back_a_failure_too(world):
    """`models activate --no-catch-up` (no live ingestion, no Redis job) fails like a job does:
    exit code 2, one line, and the state from before it restored."""
    gateway, _, _ = world
    _, client = gateway()
    before = _state(client)
    failed = looksync(
        "models", "activate", "--version", "2", "--catalog", str(gateway.catalogs / "short.jsonl"),
        "--no-catch-up", "--min-overlap", "0.999", "--quiet", env=gateway.env,
    )  # fmt: skip
    assert failed.returncode == 2, failed.stderr
    assert "validation failed" in failed.stderr and "Traceback" not in failed.stderr
    assert _state(client) == before
    missing = looksync("models", "drop", "--version", "9", env=gateway.env)
    assert (
        missing.returncode == 2 and "error: FAILED_PRECONDITION: no index products-clip-v9" in missing.stderr
    )


def test_cancel_rolls_back(world, held_images):
    gateway, _, _ = world
    _, client = gateway()
    before, started = _held_activation(client)
    cancelled = client.cancel_job(started.job_id)
    held_images.set()  # the fetch in the cancelled rebuild's thread may finish now
    assert cancelled.state == "cancelled" and "CancelJob" in cancelled.error
    assert _state(client) == {**before, "job": ("cancelled", "reindex")}


def test_a_job_whose_lock_another_job_took_stops_and_undoes_nothing(world, held_images, redis_url):
    """A heartbeat late past the TTL (a starved machine, a Redis outage) and meanwhile another
    gateway took the lock: the job must not restore its "before", which would drop the index
    the other job is building. It stops, reads as interrupted, and a retry finishes it."""
    gateway, _, total = world
    _, client = gateway()
    _, started = _held_activation(client)
    during = _state(client)
    assert during["written"] == ["products-clip-v2"] and during["loaded"] == [1, 2]
    r = redis_sync.Redis.from_url(redis_url)
    lock = "looksync:swap-lock:products"
    r.set(lock, "another-job", px=600_000)
    stopped = wait_for(
        lambda: (j := client.get_job(started.job_id)).state == "interrupted" and j,
        what="the job to notice that another job holds its lock",
    )
    assert stopped.stage == "reindex"
    assert _state(client) == {**during, "job": ("interrupted", "reindex")}
    assert r.get(lock) == b"another-job"  # never released by the job that lost it

    # The other job is gone; retrying the version resumes the stopped job and completes it.
    r.delete(lock)
    held_images.set()
    again = client.activate_model(2, "catalog.jsonl", grace_s=0.5, force=True)
    done = client.wait_job(again.job_id, poll_s=0.2, timeout_s=300)
    assert done.state == "succeeded", done.error
    assert done.result.products == total
    assert any(f"resumed interrupted job {started.job_id}" in s for s in done.steps), done.steps
    assert _state(client)["alias"] == "products-clip-v2"


@pytest.mark.parametrize("then", ["retry", "rollback"])
def test_a_gateway_killed_mid_swap_leaves_a_state_a_retry_or_rollback_completes(world, held_images, then):
    gateway, url, total = world
    gw, client = gateway()
    before, started = _held_activation(client)
    os.kill(gw.process.pid, signal.SIGKILL)
    gw.process.wait(30)

    gw2, client2 = gateway("restarted")
    # The dead gateway's lock lapses: the job reads as interrupted, its leftovers are visible.
    state = wait_for(
        lambda: (s := _state(client2))["job"] == ("interrupted", "reindex") and s, what="interrupted"
    )
    assert state["loaded"] == [1, 2] and state["written"] == ["products-clip-v2"]
    assert state["alias"] == "products-clip-v1"
    # Another version cannot start over an interrupted one.
    _refused(
        lambda: client2.activate_model(1, "catalog.jsonl", force=True),
        grpc.StatusCode.FAILED_PRECONDITION,
        "interrupted",
    )
    held_images.set()
    if then == "retry":
        resumed = client2.activate_model(2, "catalog.jsonl", grace_s=0.5, force=True)
        job = client2.wait_job(resumed.job_id, poll_s=0.2, timeout_s=300)
        assert job.state == "succeeded", job.error
        assert any(s.startswith("resumed interrupted job") for s in job.steps)
        assert job.result.products == total
        after = _state(client2)
        assert after["alias"] == "products-clip-v2" and after["loaded"] == [2]
        assert client2.get_job(started.job_id).state == "failed"  # superseded by the retry
    else:
        client2.rollback_model()
        assert _state(client2) == {**before, "job": ("rolled_back", "reindex")}


def test_sigterm_during_an_activation_rolls_it_back(world, held_images):
    gateway, _, _ = world
    gw, client = gateway()
    before, started = _held_activation(client)
    gw.process.send_signal(signal.SIGTERM)
    held_images.set()  # the rebuild's fetch thread ends; the job itself is cancelled
    assert gw.process.wait(90) == 0
    _, client2 = gateway("after-sigterm")
    job = client2.get_job(started.job_id)
    assert job.state == "cancelled" and "shutting down" in job.error
    assert _state(client2) == {**before, "job": ("cancelled", "reindex")}
