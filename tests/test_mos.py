"""The MOS study: agreement statistics, the aggregate tables, and the annotation page driven by
a real headless Chromium (Debian's, installed by `scripts/setup.sh --test`) against tasks
prepared from real look searches through the gateway."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from statistics import mean

import pytest

from benchmarks.mos.agreement import krippendorff_alpha_interval, within_one
from benchmarks.mos.report import agreement_table, preference_table, score_table
from benchmarks.mos.store import CRITERIA
from clients.world import write_world
from tests.conftest import REPO


def test_alpha_reproduces_krippendorffs_worked_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 coders, 12 units,
    # missing values; interval alpha = 0.849.
    n = None
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    units = {u: [c[u] for c in coders if c[u] is not None] for u in range(12)}
    assert krippendorff_alpha_interval(units) == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha_interval({"a": [3, 3], "b": [1, 1], "c": [5, 5]}) == 1.0
    assert krippendorff_alpha_interval({"a": [3, 3], "b": [3, 3]}) is None  # no variance at all
    assert krippendorff_alpha_interval({"a": [1, 5], "b": [5, 1]}) < 0  # systematic disagreement
    assert within_one({"a": [1, 2], "b": [1, 4]}) == 0.5


def test_tables_pool_by_system_gender_annotator():
    rows = []
    for system, base in (("clip", 4), ("dino", 2)):
        for annotator, bump in (("ann", 0), ("bob", 1)):
            for look, gender in (("l1", "women"), ("l2", "men")):
                rows.append(
                    {"annotator": annotator, "item": f"{look}:{system}", "system": system, "look": look,
                     "gender": gender, **{c: min(5, base + bump) for c in CRITERIA}}
                )  # fmt: skip
    table = {(r["system"], r["gender"], r["annotator"]): r for r in score_table(rows)}
    assert table[("clip", "women", "ann")]["overall"] == 4 and table[("clip", "women", "bob")]["overall"] == 5
    assert table[("clip", "all", "all")] == {
        "system": "clip", "gender": "all", "annotator": "all", "n": 4, **{c: 4.5 for c in CRITERIA}
    }  # fmt: skip
    assert table[("dino", "men", "all")]["n"] == 2
    agreement = {r["criterion"]: r for r in agreement_table(rows)}
    assert agreement["overall"]["items"] == 4 and agreement["overall"]["within_1"] == 1.0
    prefs = preference_table(
        [
            {"left_system": "dino", "right_system": "clip", "choice": "right", "gender": "women"},
            {"left_system": "clip", "right_system": "dino", "choice": "left", "gender": "men"},
            {"left_system": "clip", "right_system": "dino", "choice": "tie", "gender": "men"},
        ]
    )
    pooled = next(p for p in prefs if p["gender"] == "all")
    assert (pooled["a"], pooled["wins_a"], pooled["wins_b"], pooled["ties"]) == ("clip", 2, 0, 1)
    assert pooled["a_preferred"] == pytest.approx(2.5 / 3, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# The page, in a browser
# ---------------------------------------------------------------------------------------------


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = "/usr/lib/chromium/chromium" if Path("/usr/lib/chromium/chromium").exists() else None
    binary = binary or shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.fail(
            "Debian chromium and chromium-driver are missing: run `make test` (scripts/setup.sh --test)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-extensions",
        "--no-first-run",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture(scope="module")
def study(client, gateway, catalog, tmp_path_factory):
    """Tasks for 3 looks x 2 systems: the alias's space, and the same space named explicitly
    (so the space a request names is exercised too)."""
    root = tmp_path_factory.mktemp("mos")
    write_world(root / "world", products=40, looks=3, seed=5)
    # As the README writes it: relative paths, run from the folder that holds the world.
    prepared = subprocess.run(
        [sys.executable, "-m", "benchmarks.mos", "prepare", "--world", "world", "--out", "tasks",
         "--looks", "3", "--k", "3", "--catalog-root", str(catalog.parent),
         "--system", f"alias={gateway.address}", "--system", f"named={gateway.address}/clip:1"],
        cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    tasks = json.loads((root / "tasks" / "tasks.json").read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.mos", "serve", "--tasks", str(root / "tasks"),
         "--db", str(root / "mos.sqlite"), "--port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("MOS page: http://"), line
        yield line.split(": ", 1)[1].strip().rstrip("/"), tasks, root / "mos.sqlite", root / "tasks"
    finally:
        proc.terminate()
        proc.wait(10)


def test_prepared_tasks_are_self_contained(study):
    url, tasks, _, folder = study
    assert len(tasks["items"]) == 6 and len(tasks["pairs"]) == 3
    item = tasks["items"][0]
    assert item["layers"] and all(len(layer["products"]) <= 3 for layer in item["layers"])
    assert item["space"] == "clip v1"
    product = item["layers"][0]["products"][0]
    with urllib.request.urlopen(f"{url}/{product['image']}", timeout=5) as resp:
        body, ctype = resp.read(), resp.headers["Content-Type"]
    assert (ctype, body[:3]) in {("image/png", b"\x89PN"), ("image/jpeg", b"\xff\xd8\xff")}
    assert body == (folder / product["image"]).read_bytes()
    for bad in (
        "/tasks.json",
        "/img/../tasks.json",
        "/img/%2e%2e/tasks.json",
        "/img/%2E%2E/%2E%2E/mos.sqlite",
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url + bad, timeout=5)
        assert caught.value.code == 404


def _submit(driver, button) -> None:
    """Click a submit button and wait until the next page has replaced this one."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    def replaced(driver) -> bool:
        # Chromium sometimes reports the old page's node as "does not belong to the document"
        # (a plain WebDriverException) rather than a stale reference: both mean it was replaced.
        try:
            return expected_conditions.staleness_of(button)(driver)
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc):
                return True
            raise

    button.click()
    WebDriverWait(driver, 10).until(replaced)


def _score_all(driver, url: str, annotator: str, score_of) -> dict[str, dict[str, int]]:
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    driver.find_element(By.ID, "annotator").send_keys(annotator)
    _submit(driver, driver.find_element(By.ID, "start"))
    given = {}
    for _ in range(20):
        if driver.find_elements(By.ID, "done"):
            return given
        page = driver.page_source
        assert "alias" not in page and "named" not in page  # blind: no system name on the page
        assert "no image" not in page  # every item shows its look (and its products)
        look = driver.find_element(By.CSS_SELECTOR, "img[alt='look']")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", look) > 0
        item = driver.find_element(By.NAME, "item").get_attribute("value")
        scores = {c: score_of(item, c) for c in CRITERIA}
        for c, v in scores.items():
            driver.find_element(By.ID, f"{c}-{v}").click()
        _submit(driver, driver.find_element(By.ID, "submit"))
        given[item] = scores
    raise AssertionError("the page never said it was done")


def test_annotators_score_in_chromium_and_the_table_aggregates(study):
    from selenium.webdriver.common.by import By

    url, tasks, db, _ = study
    driver = _browser()
    try:
        # Two annotators who mostly agree: bob is one point harsher on the "named" system.
        system = {i["id"]: i["system"] for i in tasks["items"]}
        ann = _score_all(driver, url, "ann", lambda item, c: 4 if system[item] == "alias" else 3)
        bob = _score_all(driver, url, "bob", lambda item, c: 4 if system[item] == "alias" else 2)
        assert len(ann) == len(bob) == 6

        # Blind comparisons: ann always picks the left set ("A"), whatever system it shows.
        driver.get(f"{url}/compare?annotator=ann")
        for _ in range(3):
            _submit(driver, driver.find_element(By.ID, "choose-a"))
        assert driver.find_elements(By.ID, "done")

        driver.get(url + "/results")
        rows = driver.find_element(By.ID, "scores").find_elements(By.TAG_NAME, "tr")
        header = [th.text for th in rows[0].find_elements(By.TAG_NAME, "th")]
        cells = [dict(zip(header, (td.text for td in r.find_elements(By.TAG_NAME, "td")))) for r in rows[1:]]
        by_key = {(r["system"], r["gender"], r["annotator"]): r for r in cells}
        assert float(by_key[("alias", "all", "ann")]["overall"]) == 4.0
        assert float(by_key[("named", "all", "bob")]["overall"]) == 2.0
        assert float(by_key[("named", "all", "all")]["overall"]) == 2.5
        genders = {g for _, g, _ in by_key} - {"all"}
        assert genders and genders <= {"women", "men", "unisex"}

        # Agreement as the page shows it equals alpha over what the browser submitted.
        units = {i: [ann[i]["overall"], bob[i]["overall"]] for i in ann}
        shown = driver.find_element(By.ID, "agreement").find_elements(By.TAG_NAME, "tr")
        overall = next(r for r in shown if r.text.startswith("overall"))
        expected = round(krippendorff_alpha_interval(units), 3)
        assert f" {expected} " in f" {overall.text} ", overall.text

        prefs = driver.find_element(By.ID, "preferences").text
        assert "alias named" in prefs
    finally:
        driver.quit()

    # What the page stored: every submitted score, and the preferences matching the sides shown.
    with sqlite3.connect(db) as conn:
        stored = {(a, i): o for a, i, o in conn.execute("SELECT annotator, item, overall FROM scores")}
        assert stored == {**{("ann", i): s["overall"] for i, s in ann.items()},
                          **{("bob", i): s["overall"] for i, s in bob.items()}}  # fmt: skip
        picks = list(conn.execute("SELECT choice, left_system, right_system FROM preferences"))
    assert len(picks) == 3 and {c for c, _, _ in picks} == {"left"}
    report = json.loads(urllib.request.urlopen(url + "/results.json", timeout=5).read())
    pooled = next(p for p in report["preferences"] if p["gender"] == "all")
    assert pooled["wins_a"] == sum(left == "alias" for _, left, _ in picks)
    assert mean(s["overall"] for s in ann.values()) == 3.5


def test_bad_submissions_are_refused_and_store_nothing(study):
    url, tasks, db, _ = study
    item = tasks["items"][0]["id"]

    def post(path, **form):
        data = urllib.parse.urlencode(form).encode()
        try:
            urllib.request.urlopen(urllib.request.Request(url + path, data=data), timeout=5)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        return 200, ""

    good = {c: "3" for c in CRITERIA}
    code, page = post("/score", annotator="carol", item=item, **{**good, "fabric": "7"})
    assert code == 400 and "fabric: &#x27;7&#x27; is not a score from 1 to 5" in page
    code, page = post("/score", annotator="carol", item="no-such-item", **good)
    assert code == 400 and "is not an item of this study" in page
    code, page = post("/score", annotator="<script>", item=item, **good)
    assert code == 400 and "annotator:" in page and "<script>" not in page
    code, page = post("/compare", annotator="carol", pair=tasks["pairs"][0]["id"], choice="both")
    assert code == 400 and "choice: &#x27;both&#x27;" in page
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM scores WHERE annotator = 'carol'").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM preferences WHERE annotator = 'carol'").fetchone() == (0,)


def test_ab_sides_are_balanced_across_annotators_and_stable(study, tmp_path):
    from benchmarks.mos.server import Study

    _, tasks, _, folder = study
    s = Study(folder, tmp_path / "other.sqlite")
    pair = tasks["pairs"][0]
    firsts = [s.sides(f"annotator-{n}", pair)[0]["system"] for n in range(200)]
    assert 70 <= firsts.count("alias") <= 130  # about half see each system as A
    assert s.sides("ann", pair) == s.sides("ann", pair)  # the same on every reload


def test_a_bad_content_length_is_refused_without_waiting(study):
    import http.client

    url, *_ = study
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    for length in ("-1", "abc", str(1 << 20)):
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.putrequest("POST", "/score")
        conn.putheader("Content-Length", length)
        conn.endheaders()
        assert conn.getresponse().status == 413
        conn.close()
