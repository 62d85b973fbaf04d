"""The request every benchmark sends: a realistic, small chat completion (non-streaming).

A system prompt and a user question (~0.9 kB of JSON) to ``gpt-4o-mini`` with ``max_tokens``
16, so the demo backend answers 16 tokens at once. With Envoy's headers the HTTP request the
ext_authz filter sends the sidecar's Check for it is ~1.2 kB (:mod:`bench.body_decode`).
"""

from __future__ import annotations

import json
from typing import Any

from billing import pricing
from billing.usage import Usage
from billingproxy.devstack import demo_backend

MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
PATH = "/v1/chat/completions"

_SYSTEM = (
    "You are a concise assistant for a logistics company. Answer in at most two sentences, "
    "cite the order number when the user gives one, never invent tracking numbers, and when "
    "you are unsure say so and suggest contacting support at the address on the invoice. "
    "Prefer metric units. Do not repeat the question back to the user."
)
_USER = (
    "Hi! My order 48213-B was supposed to arrive on Tuesday but the tracking page still says "
    "'label created'. I paid for express shipping to Rotterdam. Can you tell me whether the "
    "parcel has left the warehouse yet, and if not, whether I can switch to standard shipping "
    "and get the difference refunded? Thanks a lot for your help."
)

REQUEST: dict[str, Any] = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": _USER},
    ],
    "max_tokens": MAX_TOKENS,
    "temperature": 0.2,
    "user": "bench-user-0001",
}
BODY = json.dumps(REQUEST).encode()

# What the demo backend will report, hence what each request must be charged.
PROMPT_TOKENS = demo_backend.prompt_tokens(REQUEST["messages"])
COMPLETION_TOKENS = demo_backend.completion_tokens(REQUEST)


def cost_nano(prices: pricing.PriceBook) -> int:
    """What each request of the workload is charged at ``prices``."""
    price = prices.price(MODEL)
    assert price is not None, f"the price table has no {MODEL}"
    return prices.cost_nano(
        price, Usage.tokens(prompt_tokens=PROMPT_TOKENS, completion_tokens=COMPLETION_TOKENS)
    )


# The floor: a request whose Check needs no database (listing models is free: no hold, nothing to
# settle), through the same filters. What billing adds to it is the cost of the ext_authz hop,
# the Lua filter and the access log alone, without PostgreSQL on the request's path.
FREE_PATH = "/v1/models"
FREE_METHOD = "GET"
