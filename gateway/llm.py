"""The LLM behind any OpenAI-compatible endpoint, called with the `openai` package.

Answers must be JSON matching a pydantic model; anything else (HTTP errors, timeouts, text that
is not JSON, JSON that fails validation) is an LLMError, which callers answer with a fallback.

`openai` (the `llm` extra) is imported only when an LLMClient is made: the look pipeline imports
this module for LLMError and the prompts whether or not an LLM is configured, and a gateway
without one runs without the package.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)

PROMPTS = Path(__file__).resolve().parent / "prompts"


class LLMError(Exception):
    """The LLM failed or its answer could not be trusted; the reason is for logs and metrics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_prompt(name: str) -> tuple[str, str]:
    """(version, text) of a prompt file `prompts/<name>.v<N>.md`; the highest N wins."""
    candidates = sorted(PROMPTS.glob(f"{name}.v*.md"), key=lambda p: int(p.stem.rsplit(".v", 1)[1]))
    if not candidates:
        raise FileNotFoundError(f"no prompt {name}.v*.md in {PROMPTS}")
    path = candidates[-1]
    return path.stem.rsplit(".", 1)[1], path.read_text(encoding="utf-8")


def image_part(image: bytes, mime: str = "image/jpeg") -> dict:
    return {
        "type": "image_url",
        "image_url": {"url": f"data:{mime};base64,{base64.b64encode(image).decode()}"},
    }


class LLMClient:
    def __init__(self, base_url: str, model: str, api_key: str | None):
        import openai

        # Retries are the caller's decision: a retry inside a 300 ms budget is a timeout.
        self.openai = openai
        self.model = model
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0)

    async def complete_json(self, schema: type[T], system: str, user: list[dict], timeout_s: float) -> T:
        if timeout_s <= 0.01:
            raise LLMError("no_budget", f"{timeout_s * 1000:.0f} ms left")
        openai = self.openai
        try:
            # The client's own timeout applies per phase (connect, write, each read), so a
            # server that trickles bytes could outlast it: one hard limit over the whole call.
            async with asyncio.timeout(timeout_s):
                response = await self._create(schema, system, user, timeout_s)
        except (openai.APITimeoutError, TimeoutError):
            raise LLMError("timeout", f"no answer within {timeout_s * 1000:.0f} ms") from None
        except openai.APIStatusError as exc:
            raise LLMError("http_error", f"HTTP {exc.status_code}") from None
        except openai.APIError as exc:
            raise LLMError("unreachable", type(exc).__name__) from None
        try:
            content = response.choices[0].message.content or ""
            return schema.model_validate(json.loads(content))
        except (IndexError, AttributeError, json.JSONDecodeError) as exc:
            raise LLMError("malformed", f"answer is not JSON ({exc})") from None
        except ValidationError as exc:
            raise LLMError("invalid", f"answer fails the schema ({exc.error_count()} errors)") from None

    async def _create(self, schema: type[T], system: str, user: list[dict], timeout_s: float):
        return await self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            response_format={
                "type": "json_schema",
                # Not "strict": OpenAI's strict mode rejects common schema keywords (minLength, ...), and
                # the answer is validated here anyway.
                "json_schema": {
                    "name": schema.__name__,
                    "schema": schema.model_json_schema(),
                    "strict": False,
                },
            },
            temperature=0,
            timeout=timeout_s,
        )

    async def close(self) -> None:
        await self.client.close()
