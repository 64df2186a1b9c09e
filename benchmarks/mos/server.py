"""The annotation page: a look and its top products per layer; the annotator scores 1-5 on
colour, fit, sleeve, fabric, pattern and overall (`/score`), or picks the better of two result
sets shown side by side as A and B (`/compare`). Which system made a result set is never on the
page; the A/B order is a hash of annotator and pair, so it differs between annotators and pairs
and stays the same on reload. `/results` has the aggregate tables.

A standard-library HTTP server: annotators are a handful of people on an internal network, and
the task folder (benchmarks/mos/tasks.py) plus one SQLite file is the whole study.
"""

from __future__ import annotations

import hashlib
import html
import json
import mimetypes
import random
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from benchmarks.mos.report import report
from benchmarks.mos.store import CRITERIA, BadInput, Store, check_annotator, check_scores

MAX_FORM_BYTES = 16 << 10

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
.look{display:flex;gap:1.5rem;align-items:flex-start}
.look>img{height:420px;border:1px solid #ccc}
.layer{margin:.4rem 0 1rem}.layer h3{margin:.2rem 0;font-size:1rem}
.products{display:flex;gap:.6rem}.product{width:120px;font-size:.75rem}
.product img{width:120px;height:120px;object-fit:contain;background:#f4f4f4}
fieldset{border:0;margin:.3rem 0;padding:0}legend{font-weight:600;width:6rem;float:left}
label{margin-right:.7rem}.sets{display:flex;gap:2rem}.set{flex:1}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .5rem}
.error{color:#a00;font-weight:600}
"""


class Study:
    def __init__(self, tasks_dir: Path, db: Path):
        self.root = Path(tasks_dir).resolve()
        tasks = json.loads((self.root / "tasks.json").read_text())
        self.items = {i["id"]: i for i in tasks["items"]}
        self.pairs = {p["id"]: p for p in tasks["pairs"]}
        self.store = Store(db)

    def _order(self, annotator: str, ids: list[str]) -> list[str]:
        # Each annotator sees the items in an own fixed order: no position bias shared by all.
        seed = int(hashlib.sha1(annotator.encode()).hexdigest()[:8], 16)
        ids = sorted(ids)
        random.Random(seed).shuffle(ids)
        return ids

    def _next(self, annotator: str, pool: dict, done: set[str]) -> tuple[dict | None, int, int]:
        """The annotator's next unjudged task, how many are done, how many there are."""
        left = [i for i in self._order(annotator, list(pool)) if i not in done]
        return (pool[left[0]] if left else None), len(pool) - len(left), len(pool)

    def next_item(self, annotator: str) -> tuple[dict | None, int, int]:
        return self._next(annotator, self.items, self.store.scored_items(annotator))

    def next_pair(self, annotator: str) -> tuple[dict | None, int, int]:
        return self._next(annotator, self.pairs, self.store.judged_pairs(annotator))

    def sides(self, annotator: str, pair: dict) -> tuple[dict, dict]:
        """(left, right) items of a pair for this annotator: blind and balanced."""
        a, b = (self.items[i] for i in pair["items"])
        flip = hashlib.sha1(f"{annotator}|{pair['id']}".encode()).digest()[0] & 1
        return (b, a) if flip else (a, b)

    def file(self, relative: str) -> Path | None:
        path = (self.root / relative).resolve()
        return path if path.is_file() and path.is_relative_to(self.root / "img") else None


# ---------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _img(src: str, alt: str) -> str:
    if not src:
        return f"<div class='missing'>{html.escape(alt)}: no image</div>"
    url = src if src.startswith(("http://", "https://")) else "/" + quote(src)
    return f"<img src='{html.escape(url)}' alt='{html.escape(alt)}'>"


def _result_set(item: dict) -> str:
    parts = []
    for layer in item["layers"]:
        products = "".join(
            f"<div class='product'>{_img(p['image'], p['title'])}<div>{html.escape(p['title'])}</div>"
            f"<div>{html.escape(p['brand'])} · {p['price']:.2f} {html.escape(p['currency'])}</div></div>"
            for p in layer["products"]
        )
        parts.append(
            f"<div class='layer'><h3>{html.escape(layer['layer'])}</h3>"
            f"<div class='products'>{products or 'no products'}</div></div>"
        )
    return "".join(parts)


def index_page(error: str = "") -> str:
    return _page(
        "LookSync MOS",
        "<h1>LookSync MOS study</h1>"
        + (f"<p class='error'>{html.escape(error)}</p>" if error else "")
        + "<form method='get' action='/start'><label>Your name "
        "<input id='annotator' name='annotator' required maxlength='64'></label> "
        "<label><input type='radio' name='mode' value='score' checked> score results</label>"
        "<label><input type='radio' name='mode' value='compare' id='mode-compare'> compare A/B</label>"
        "<button id='start'>Start</button></form><p><a href='/results'>results</a></p>",
    )


def score_page(study: Study, annotator: str, error: str = "") -> str:
    item, done, total = study.next_item(annotator)
    if item is None:
        return _page(
            "done", f"<h1 id='done'>All {total} looks scored, thank you.</h1><a href='/results'>results</a>"
        )
    scales = "".join(
        f"<fieldset><legend>{c}</legend>"
        + "".join(
            f"<label><input type='radio' name='{c}' value='{v}' id='{c}-{v}' required> {v}</label>"
            for v in range(1, 6)
        )
        + "</fieldset>"
        for c in CRITERIA
    )
    return _page(
        "score",
        f"<p id='progress'>{done + 1} / {total} · {html.escape(annotator)}</p>"
        + (f"<p class='error' id='error'>{html.escape(error)}</p>" if error else "")
        + f"<div class='look'>{_img(item['image'], 'look')}<div>{_result_set(item)}</div></div>"
        "<p>How well do these products match the look? 1 = not at all, 5 = the same.</p>"
        "<form method='post' action='/score'>"
        f"<input type='hidden' name='annotator' value='{html.escape(annotator)}'>"
        f"<input type='hidden' name='item' value='{html.escape(item['id'])}'>"
        f"{scales}<button id='submit'>Save and next</button></form>",
    )


def compare_page(study: Study, annotator: str, error: str = "") -> str:
    pair, done, total = study.next_pair(annotator)
    if pair is None:
        return _page(
            "done",
            f"<h1 id='done'>All {total} comparisons done, thank you.</h1><a href='/results'>results</a>",
        )
    left, right = study.sides(annotator, pair)
    return _page(
        "compare",
        f"<p id='progress'>{done + 1} / {total} · {html.escape(annotator)}</p>"
        + (f"<p class='error' id='error'>{html.escape(error)}</p>" if error else "")
        + f"<div class='look'>{_img(left['image'], 'look')}<div class='sets'>"
        f"<div class='set'><h2>A</h2>{_result_set(left)}</div>"
        f"<div class='set'><h2>B</h2>{_result_set(right)}</div></div></div>"
        "<form method='post' action='/compare'>"
        f"<input type='hidden' name='annotator' value='{html.escape(annotator)}'>"
        f"<input type='hidden' name='pair' value='{html.escape(pair['id'])}'>"
        "<p>Which products match the look better?</p>"
        "<button name='choice' value='left' id='choose-a'>A</button> "
        "<button name='choice' value='tie' id='choose-tie'>the same</button> "
        "<button name='choice' value='right' id='choose-b'>B</button></form>",
    )


def _table(rows: list[dict], table_id: str) -> str:
    if not rows:
        return f"<p id='{table_id}'>none yet</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{'' if v is None else html.escape(str(v))}</td>" for v in r.values()) + "</tr>"
        for r in rows
    )
    return f"<table id='{table_id}'><tr>{head}</tr>{body}</table>"


def results_page(study: Study) -> str:
    r = report(study.store)
    return _page(
        "results",
        "<h1>Results</h1><h2>Mean scores (system × gender × annotator)</h2>"
        + _table(r["scores"], "scores")
        + "<h2>Agreement between annotators (Krippendorff's alpha, interval)</h2>"
        + _table(r["agreement"], "agreement")
        + "<h2>Blind preference</h2>"
        + _table(r["preferences"], "preferences")
        + "<p><a href='/results.json'>JSON</a></p>",
    )


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


def make_handler(study: Study):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, ctype: str = "text/html; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(303)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            try:
                if url.path == "/":
                    return self._send(200, index_page().encode())
                if url.path == "/start":
                    annotator = check_annotator(query.get("annotator", ""))
                    page = "compare" if query.get("mode") == "compare" else "score"
                    return self._redirect(f"/{page}?annotator={quote(annotator)}")
                if url.path == "/score":
                    return self._send(
                        200, score_page(study, check_annotator(query.get("annotator", ""))).encode()
                    )
                if url.path == "/compare":
                    return self._send(
                        200, compare_page(study, check_annotator(query.get("annotator", ""))).encode()
                    )
                if url.path == "/results":
                    return self._send(200, results_page(study).encode())
                if url.path == "/results.json":
                    return self._send(200, json.dumps(report(study.store)).encode(), "application/json")
            except BadInput as exc:
                return self._send(400, index_page(str(exc)).encode())
            path = study.file(unquote(url.path).lstrip("/"))
            if path is None:
                return self._send(404, _page("not found", "<h1>not found</h1>").encode())
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            return self._send(200, path.read_bytes(), ctype)

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_FORM_BYTES:
                return self._send(413, _page("bad size", "<h1>form missing or too large</h1>").encode())
            form = {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode("utf-8", "replace")).items()}
            path = urlsplit(self.path).path
            try:
                annotator = check_annotator(form.get("annotator", ""))
            except BadInput as exc:
                return self._send(400, index_page(str(exc)).encode())
            try:
                if path == "/score":
                    item = study.items.get(form.get("item", ""))
                    if item is None:
                        raise BadInput(f"item: {form.get('item', '')!r} is not an item of this study")
                    study.store.save_scores(annotator, item, check_scores(form))
                    return self._redirect(f"/score?annotator={quote(annotator)}")
                if path == "/compare":
                    pair = study.pairs.get(form.get("pair", ""))
                    if pair is None:
                        raise BadInput(f"pair: {form.get('pair', '')!r} is not a pair of this study")
                    left, right = study.sides(annotator, pair)
                    study.store.save_preference(
                        annotator, pair, left["system"], right["system"], form.get("choice", "")
                    )
                    return self._redirect(f"/compare?annotator={quote(annotator)}")
            except BadInput as exc:
                page = score_page if path == "/score" else compare_page
                return self._send(400, page(study, annotator, str(exc)).encode())
            return self._send(404, _page("not found", "<h1>not found</h1>").encode())

        def log_message(self, *args):
            pass

    return Handler


def serve(tasks_dir: Path, db: Path, host: str = "127.0.0.1", port: int = 8090) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(Study(tasks_dir, db)))
    server.daemon_threads = True
    return server
