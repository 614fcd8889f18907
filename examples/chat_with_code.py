#!/usr/bin/env python3
"""Chat with a model that can run Python in an appliance sandbox: the tool loop, with nothing but httpx.

    APPLIANCE_URL=http://127.0.0.1:8080 APPLIANCE_API_KEY=... \\
    OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=... MODEL=gpt-4o-mini \\
    python examples/chat_with_code.py "Fit a line to y = 3x + 1 with noise and report the slope"

Works with any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, llama.cpp server, Ollama, LiteLLM...).
The model sees one tool, run_python; each call runs in the same sandbox, so variables persist between calls.
"""

from __future__ import annotations

import json
import os
import sys

import httpx

from appliance.client import Sandbox
from appliance.client.tools import OPENAI_TOOL, run_tool_call

SYSTEM = (
    "You are a data analyst. Use the run_python tool to compute answers instead of guessing; the Python session "
    "persists between calls. When you have the answer, reply in plain text."
)
MAX_TURNS = 8


def chat(http: httpx.Client, model: str, messages: list[dict]) -> dict:
    response = http.post("/chat/completions", json={"model": model, "messages": messages, "tools": [OPENAI_TOOL]})
    if response.status_code >= 400:
        raise SystemExit(f"the model endpoint answered {response.status_code}: {response.text[:500]}")
    return response.json()["choices"][0]["message"]


def run(prompt: str) -> str:
    base_url = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
    model = os.environ.get("MODEL", "gpt-4o-mini")
    headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', '')}"}
    messages: list[dict] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as http, Sandbox() as sandbox:
        for _ in range(MAX_TURNS):
            message = chat(http, model, messages)
            messages.append({k: v for k, v in message.items() if v is not None})
            calls = message.get("tool_calls") or []
            if not calls:
                return message.get("content") or ""
            for call in calls:
                code = json.loads(call["function"].get("arguments") or "{}").get("code", "")
                print(f"--- run_python ---\n{code}", file=sys.stderr)
                result = run_tool_call(call, sandbox)
                print(f"--- result ---\n{result}", file=sys.stderr)
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return "(no answer after the maximum number of turns)"


def main() -> int:
    prompt = " ".join(sys.argv[1:]) or "What are the mean and standard deviation of the first 100 primes?"
    print(run(prompt))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
