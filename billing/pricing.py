"""What a request costs: litellm's bundled price map, read exactly, plus overrides and a markup.

Why not ``litellm.cost_per_token``: it computes in floats, and ``import litellm`` costs seconds
and ~200 MB. We read ``model_prices_and_context_window_backup.json`` from the installed litellm
distribution with ``parse_float=Decimal`` (the JSON's decimal text, kept exactly), never importing
the package. A model without a price is *unpriced*, never free: the Check refuses it.

Cost of one request = (uncached input × input price + cached input × cached price + output ×
output price) × (1 + markup / 100), computed exactly and rounded up once to a whole nano-USD.
"""

from __future__ import annotations

import dataclasses
import decimal
import importlib.metadata
import json
import math
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from billing import money

PRICE_MAP_FILE = "litellm/model_prices_and_context_window_backup.json"
MILLION = Decimal(1_000_000)
# Enough digits that no product of tokens and per-token prices is ever rounded before the one
# rounding to nano-USD (28, Decimal's default, would already be enough; this leaves no doubt).
_EXACT = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.Inexact])


class PricingError(ValueError):
    """The price map or the override file is unusable; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class ModelPrice:
    model: str
    input_usd_per_token: Decimal
    output_usd_per_token: Decimal
    cached_input_usd_per_token: Decimal
    max_output_tokens: int | None
    source: str  # "litellm" or "override"


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError("cached_tokens cannot exceed prompt_tokens")


class PriceBook:
    """Prices by model name, with the markup applied at cost time."""

    def __init__(self, prices: Mapping[str, ModelPrice], markup_percent: Decimal = Decimal(0)):
        self._prices = dict(prices)
        self._multiplier = 1 + Decimal(markup_percent) / 100
        self.markup_percent = Decimal(markup_percent)

    def __len__(self) -> int:
        return len(self._prices)

    def price(self, model: str) -> ModelPrice | None:
        return self._prices.get(model)

    def cost_nano(self, price: ModelPrice, usage: Usage) -> int:
        with decimal.localcontext(_EXACT):
            usd = (
                (usage.prompt_tokens - usage.cached_tokens) * price.input_usd_per_token
                + usage.cached_tokens * price.cached_input_usd_per_token
                + usage.completion_tokens * price.output_usd_per_token
            ) * self._multiplier
            return money.nano_from_usd_ceil(usd)

    def hold_nano(self, price: ModelPrice, *, prompt_tokens: int, max_output_tokens: int) -> int:
        """The worst-case cost reserved at admission: no cache discount, the full output budget."""
        return self.cost_nano(price, Usage(prompt_tokens=prompt_tokens, completion_tokens=max_output_tokens))


def _price_map_path() -> Path:
    try:
        dist = importlib.metadata.distribution("litellm")
    except importlib.metadata.PackageNotFoundError:
        raise PricingError(
            "litellm is not installed, so there is no price map: run `make up` (it installs "
            "litellm's data with --no-deps) or `pip install --no-deps litellm`"
        ) from None
    path = Path(str(dist.locate_file(PRICE_MAP_FILE)))
    if not path.is_file():
        raise PricingError(f"litellm is installed but has no {PRICE_MAP_FILE}")
    return path


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, Decimal):
        return value if value.is_finite() and value >= 0 else None
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value) if value >= 0 else None
    return None


def load_litellm_prices(path: Path | None = None) -> dict[str, ModelPrice]:
    """Every model in litellm's map with a positive token price (zero-priced entries are unpriced)."""
    path = path or _price_map_path()
    raw = json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    prices = {}
    for model, entry in raw.items():
        if model == "sample_spec" or not isinstance(entry, dict):
            continue
        input_price = _decimal(entry.get("input_cost_per_token"))
        output_price = _decimal(entry.get("output_cost_per_token"))
        if input_price is None and output_price is None:
            continue
        input_price = input_price or Decimal(0)
        output_price = output_price or Decimal(0)
        if input_price == 0 and output_price == 0:
            continue
        cached = _decimal(entry.get("cache_read_input_token_cost"))
        max_out = entry.get("max_output_tokens")
        prices[model] = ModelPrice(
            model=model,
            input_usd_per_token=input_price,
            output_usd_per_token=output_price,
            cached_input_usd_per_token=input_price if cached is None else cached,
            max_output_tokens=max_out if isinstance(max_out, int) and max_out > 0 else None,
            source="litellm",
        )
    return prices


class _ExactLoader(yaml.SafeLoader):
    """YAML that reads 0.15 as Decimal("0.15"), not the float 0.1499999…"""


def _exact_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    text = loader.construct_scalar(node)
    try:
        return Decimal(text)
    except decimal.InvalidOperation:
        # YAML floats include .inf, .nan and 1:30.5, which Decimal() refuses; as a YAMLError
        # this becomes load()'s PricingError, naming the file and line, not a bare InvalidOperation.
        raise yaml.constructor.ConstructorError(
            None, None, f"{text!r} is not a decimal number", node.start_mark
        ) from None


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _exact_float)

_OVERRIDE_FIELDS = {
    "input_per_million_usd",
    "output_per_million_usd",
    "cached_input_per_million_usd",
    "max_output_tokens",
    "alias_of",
}


def _per_million(where: str, value: Any) -> Decimal:
    if isinstance(value, str):
        try:
            value = Decimal(value)
        except decimal.InvalidOperation:
            raise PricingError(f"{where}: {value!r} is not a decimal number") from None
    parsed = _decimal(value)
    if parsed is None:
        raise PricingError(f"{where}: a price must be a number >= 0, such as \"0.15\", not {value!r}")
    return parsed / MILLION


def apply_overrides(prices: dict[str, ModelPrice], document: Any, *, where: str) -> dict[str, ModelPrice]:
    """Prices from an override document (see docs/pricing.md) layered over ``prices``."""
    if document is None:
        return prices
    if not isinstance(document, dict) or set(document) - {"models"}:
        raise PricingError(f"{where}: expected a mapping with one key, 'models'")
    models = document.get("models") or {}
    if not isinstance(models, dict):
        raise PricingError(f"{where}: 'models' must map model names to prices")
    result = dict(prices)
    aliases = {}
    for model, spec in models.items():
        here = f"{where}: models.{model}"
        if not isinstance(model, str) or not model or not isinstance(spec, dict):
            raise PricingError(f"{here}: each model needs a mapping of prices")
        unknown = set(spec) - _OVERRIDE_FIELDS
        if unknown:
            raise PricingError(f"{here}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_OVERRIDE_FIELDS)}")
        if "alias_of" in spec:
            if len(spec) != 1 or not isinstance(spec["alias_of"], str):
                raise PricingError(f"{here}: alias_of stands alone and names another model")
            aliases[model] = spec["alias_of"]
            continue
        for required in ("input_per_million_usd", "output_per_million_usd"):
            if required not in spec:
                raise PricingError(f"{here}: {required} is required")
        input_price = _per_million(f"{here}.input_per_million_usd", spec["input_per_million_usd"])
        max_out = spec.get("max_output_tokens")
        if max_out is not None and (not isinstance(max_out, int) or isinstance(max_out, bool) or max_out < 1):
            raise PricingError(f"{here}.max_output_tokens must be a whole number >= 1")
        result[model] = ModelPrice(
            model=model,
            input_usd_per_token=input_price,
            output_usd_per_token=_per_million(f"{here}.output_per_million_usd", spec["output_per_million_usd"]),
            cached_input_usd_per_token=(
                _per_million(f"{here}.cached_input_per_million_usd", spec["cached_input_per_million_usd"])
                if "cached_input_per_million_usd" in spec
                else input_price
            ),
            max_output_tokens=max_out,
            source="override",
        )
    for alias, target in aliases.items():
        if target not in result:
            raise PricingError(f"{where}: models.{alias}.alias_of names {target!r}, which has no price")
        result[alias] = dataclasses.replace(result[target], model=alias, source="override")
    return result


def load(overrides_path: Path | None = None, markup_percent: Decimal = Decimal(0)) -> PriceBook:
    prices = load_litellm_prices()
    if overrides_path is not None:
        try:
            document = yaml.load(overrides_path.read_text(encoding="utf-8"), Loader=_ExactLoader)
        except (OSError, yaml.YAMLError) as exc:
            raise PricingError(f"{overrides_path}: cannot read price overrides: {exc}") from None
        prices = apply_overrides(prices, document, where=str(overrides_path))
    return PriceBook(prices, markup_percent)


def prompt_tokens_bound(body_bytes: int) -> int:
    """An upper bound on a request's prompt tokens: one per byte of its body.

    Byte-level BPE (OpenAI, most open models) and SentencePiece with byte fallback (Gemini) never
    make a token of less than one byte, and the body's JSON framing more than covers the few
    tokens a chat template adds per message. A tighter guess (bytes ÷ 3 or ÷ 4 fits English) is
    beaten by text like "a a a …", and a hold below the real cost would let strict mode go
    below zero. The bound only sizes the hold; the charge uses the backend's real count.
    """
    return body_bytes
