"""A scripted OpenAI-compatible server: the real `openai` client talks HTTP to it.

Each test sets a script: a function from the parsed request to an action — a JSON answer, a
delay, an HTTP status, or raw (malformed) content. Requests are recorded for assertions.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    content: object = None  # dict/list -> JSON text; str -> sent as-is (malformed on purpose)
    status: int = 200
    delay_s: float = 0.0
    # Answer only once this is set (or after 60 s): a test holds a call open while it acts,
    # instead of guessing how long a delay is enough.
    hold: threading.Event | None = None


@dataclass
class ScriptedLLM:
    script: object = None  # callable(kind, request_json) -> Reply
    requests: list = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    arrived: threading.Condition = field(default_factory=threading.Condition)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.requests]

    def start(self) -> ScriptedLLM:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                kind = body.get("response_format", {}).get("json_schema", {}).get("name", "?")
                with stub.arrived:
                    stub.requests.append((kind, body))
                    stub.arrived.notify_all()
                reply = stub.script(kind, body) if stub.script else Reply(status=500)
                if reply.hold is not None:
                    reply.hold.wait(60)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.status != 200:
                    self._send(
                        reply.status, {"error": {"message": "scripted failure", "type": "server_error"}}
                    )
                    return
                content = reply.content if isinstance(reply.content, str) else json.dumps(reply.content)
                self._send(
                    200,
                    {
                        "id": "chatcmpl-stub",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body.get("model", "stub"),
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected in the slow cases

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def wait_for(self, kind: str, timeout_s: float = 60.0) -> None:
        """Block until a request of this kind has arrived (since `requests` was last cleared)."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: kind in self.kinds(), timeout_s):
                raise AssertionError(f"no {kind} request reached the LLM within {timeout_s}s")

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


def candidate_ids(body: dict) -> list[str]:
    """The candidate ids in a rerank request (from its JSON data block)."""
    for part in body["messages"][1]["content"]:
        if part.get("type") == "text" and part["text"].startswith("Candidates"):
            return [c["id"] for c in json.loads(part["text"].split("\n", 1)[1])]
    raise AssertionError("no candidate block in the rerank request")
