"""What a request costs: litellm's bundled price map, read exactly, plus overrides and a markup.

Why not ``litellm.cost_per_token``: it computes in floats, and ``import litellm`` costs seconds
and ~200 MB. We read ``model_prices_and_context_window_backup.json`` from the installed litellm
distribution with ``parse_float=Decimal`` (the JSON's decimal text, kept exactly), never importing
the package. A model without a price is *unpriced*, never free: the Check refuses it.

Cost of one request = Σ over the dimensions of :class:`billing.usage.Usage` (uncached and cached
input, cache writes, audio, output, reasoning) of tokens × that dimension's price — the long-
context tier's when the prompt exceeds it — × (1 + markup / 100), computed exactly and rounded up
once to a whole nano-USD. Every cost key of a model's entry is accounted for: priced, not
applicable because the Check refuses what incurs it (batch and non-default service-tier prices,
web search, hosted tools), or unpriced — and then the Check refuses the model, naming the key.
"""

from __future__ import annotations

import dataclasses
import decimal
import importlib.metadata
import json
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from billing import errors, money
from billing.usage import Usage

PRICE_MAP_FILE = "litellm/model_prices_and_context_window_backup.json"
MILLION = Decimal(1_000_000)
# Enough digits that no product of tokens and per-token prices is ever rounded before the one
# rounding to nano-USD (28, Decimal's default, would already be enough; this leaves no doubt).
_EXACT = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN, traps=[decimal.Inexact])


class PricingError(errors.UserFacingError, ValueError):
    """The price map or the override file is unusable; the message says where and why."""


class UnpricedUsage(ValueError):
    """An answer reported tokens in a dimension this model has no price for (the Check refuses
    requests that could incur one, so this means the backend did something unasked)."""


# Each dimension of billing.usage.Usage and the litellm key that prices it.
DIMENSION_KEYS: dict[str, str] = {
    "input_text": "input_cost_per_token",
    "input_cached": "cache_read_input_token_cost",
    "input_cache_write_5m": "cache_creation_input_token_cost",
    "input_cache_write_1h": "cache_creation_input_token_cost_above_1hr",
    "input_audio": "input_cost_per_audio_token",
    "output_text": "output_cost_per_token",
    "output_reasoning": "output_cost_per_reasoning_token",
    "output_audio": "output_cost_per_audio_token",
}
INPUT_DIMENSIONS = frozenset(d for d in DIMENSION_KEYS if d.startswith("input_"))
OUTPUT_DIMENSIONS = frozenset(d for d in DIMENSION_KEYS if d.startswith("output_"))
# When a key is absent, the dimension costs this many times another dimension's price. Each
# rule is the provider's documented relation (a cache read never costs more than a plain read;
# Anthropic's cache writes cost 1.25× input for 5 minutes, 2× for an hour; reasoning is billed as
# output), so the fallback is never below the real price.
_FALLBACKS: dict[str, tuple[str, Decimal]] = {
    "input_cached": ("input_text", Decimal(1)),
    "input_cache_write_5m": ("input_text", Decimal("1.25")),
    "input_cache_write_1h": ("input_text", Decimal(2)),
    "output_reasoning": ("output_text", Decimal(1)),
}
# Synonyms some providers' entries use for a dimension's key.
_KEY_SYNONYMS = {"input_cost_per_token_cache_hit": "cache_read_input_token_cost"}
# Prices that apply only to a way of calling the gateway never admits: the Batch API, and service
# tiers other than the default, which the Check refuses (billing/endpoints.py).
_NOT_ADMITTED_SUFFIXES = ("_batches", "_priority", "_flex")
# Fees of request features the Check refuses on every endpoint (web search, hosted tools).
_REFUSED_FEATURE_KEYS = frozenset(
    {
        "search_context_cost_per_query",
        "google_maps_grounding_cost_per_query",
        "code_interpreter_cost_per_session",
    }
)
# Models that search the web on every call, asked or not (OpenAI's *-search-preview and
# *-search-api, deep-research models, Perplexity's Sonar): their per-query fee cannot be refused
# away like a tool's, and no usage object reports the queries, so it is unpriced for them.
_ALWAYS_SEARCHING_NAMES = ("search", "sonar", "deep-research")
_ALWAYS_SEARCHING_PROVIDERS = frozenset({"perplexity"})
# Keys whose price applies only with audio input; the gateway prices uncached audio only, so a
# model carrying one of these is refused audio input.
_AUDIO_INPUT_ONLY_KEYS = frozenset(
    {"cache_read_input_audio_token_cost", "cache_creation_input_audio_token_cost"}
)
_TIER = re.compile(r"(?P<key>.+)_above_(?P<thousands>\d+)k_tokens")


@dataclasses.dataclass(frozen=True)
class Tier:
    """Long-context prices: when a request's prompt exceeds ``above_tokens``, these replace the
    base price of each dimension they name (litellm's ``*_above_200k_tokens`` keys)."""

    above_tokens: int
    per_token: Mapping[str, Decimal]


@dataclasses.dataclass(frozen=True)
class ModelPrice:
    """Every price of one model, per token and per dimension of :class:`billing.usage.Usage`.

    ``unpriced`` names cost keys of the model's entry that the gateway cannot price: the Check
    refuses the model rather than bill them $0. ``audio_input_unpriced`` names one that applies
    only to audio input: audio input is refused for the model.
    """

    model: str
    per_token: Mapping[str, Decimal]
    max_output_tokens: int | None
    source: str  # "litellm" or "override"
    max_input_tokens: int | None = None
    tiers: tuple[Tier, ...] = ()
    unpriced: tuple[str, ...] = ()
    audio_input_unpriced: str | None = None

    @classmethod
    def tokens(
        cls,
        model: str,
        input_usd: Decimal,
        output_usd: Decimal,
        cached_usd: Decimal | None = None,
        *,
        max_output_tokens: int | None = None,
        max_input_tokens: int | None = None,
        source: str = "override",
    ) -> ModelPrice:
        """A model priced by text tokens alone (overrides, tests); other dimensions fall back."""
        explicit = {"input_text": input_usd, "output_text": output_usd}
        if cached_usd is not None:
            explicit["input_cached"] = cached_usd
        return cls(model, _with_fallbacks(explicit), max_output_tokens, source, max_input_tokens)

    @property
    def input_usd_per_token(self) -> Decimal:
        return self.per_token["input_text"]

    @property
    def output_usd_per_token(self) -> Decimal:
        return self.per_token["output_text"]

    @property
    def cached_input_usd_per_token(self) -> Decimal:
        return self.per_token["input_cached"]

    def price_of(self, dimension: str, input_total: int) -> Decimal | None:
        """The per-token price of ``dimension`` for a request of ``input_total`` prompt tokens."""
        price = self.per_token.get(dimension)
        for tier in self.tiers:  # ascending thresholds: the last one exceeded wins
            if input_total > tier.above_tokens and dimension in tier.per_token:
                price = tier.per_token[dimension]
        return price

    def highest(self, dimensions: frozenset[str] | set[str]) -> Decimal:
        """The highest per-token price among ``dimensions``, over every tier (the hold's rate)."""
        candidates = [self.per_token[d] for d in dimensions if d in self.per_token]
        candidates += [tier.per_token[d] for tier in self.tiers for d in dimensions if d in tier.per_token]
        return max(candidates, default=Decimal(0))

    def unpriced_for(self, dimensions: frozenset[str] | set[str]) -> str | None:
        """The first cost this model has that a request able to incur ``dimensions`` could not be
        billed for, or None when every one is priced."""
        if self.unpriced:
            return self.unpriced[0]
        if "input_audio" in dimensions and self.audio_input_unpriced:
            return self.audio_input_unpriced
        for dimension in sorted(dimensions):
            if dimension not in self.per_token:
                return DIMENSION_KEYS[dimension]
        return None


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
        """Σ tokens × price over every dimension, × markup, rounded up once.

        Raises :class:`UnpricedUsage` for tokens in a dimension the model has no price for.
        """
        total = usage.input_total
        with decimal.localcontext(_EXACT):
            usd = Decimal(0)
            for dimension, count in usage.details().items():
                rate = price.price_of(dimension, total)
                if rate is None:
                    raise UnpricedUsage(f"{price.model} has no price for {dimension} ({count} tokens)")
                usd += count * rate
            return money.nano_from_usd_ceil(usd * self._multiplier)

    def hold_nano(
        self,
        price: ModelPrice,
        *,
        prompt_tokens: int,
        max_output_tokens: int,
        dimensions: frozenset[str] | set[str] = frozenset({"input_text", "output_text"}),
    ) -> int:
        """The worst case reserved at admission: every prompt token at the highest input-side
        price among ``dimensions`` (cache writes cost more than reads), every output token at the
        highest output-side one, over every long-context tier."""
        with decimal.localcontext(_EXACT):
            usd = (
                prompt_tokens * price.highest(INPUT_DIMENSIONS & set(dimensions))
                + max_output_tokens * price.highest(OUTPUT_DIMENSIONS & set(dimensions))
            ) * self._multiplier
            return money.nano_from_usd_ceil(usd)

    def output_within(
        self,
        price: ModelPrice,
        budget_nano: int,
        *,
        prompt_tokens: int,
        choices: int,
        dimensions: frozenset[str] | set[str],
    ) -> int:
        """The largest output budget per choice (``max_tokens``) whose hold fits ``budget_nano``;
        0 when not even the prompt fits."""

        def fits(per_choice: int) -> bool:
            hold = self.hold_nano(
                price,
                prompt_tokens=prompt_tokens,
                max_output_tokens=per_choice * choices,
                dimensions=dimensions,
            )
            return hold <= budget_nano

        if not fits(0):
            return 0
        rate = price.highest(OUTPUT_DIMENSIONS & set(dimensions)) * self._multiplier * choices
        if rate == 0:
            return price.max_output_tokens or 0
        with decimal.localcontext(decimal.Context(prec=80, rounding=decimal.ROUND_FLOOR)):
            prompt_usd = prompt_tokens * price.highest(INPUT_DIMENSIONS & set(dimensions)) * self._multiplier
            guess = max(0, int((Decimal(budget_nano) / money.NANO_PER_USD - prompt_usd) / rate))
        # The estimate is within a token or two of the answer (the hold rounds up once): settle it
        # against the hold itself.
        while guess > 0 and not fits(guess):
            guess -= 1
        while fits(guess + 1):
            guess += 1
        return guess


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


def _with_fallbacks(explicit: Mapping[str, Decimal]) -> dict[str, Decimal]:
    per_token = dict(explicit)
    for dimension, (base, factor) in _FALLBACKS.items():
        if dimension not in per_token and base in per_token:
            per_token[dimension] = per_token[base] * factor
    return per_token


_DIMENSION_BY_KEY = {key: dimension for dimension, key in DIMENSION_KEYS.items()}


def _model_price(model: str, entry: Mapping[str, Any]) -> ModelPrice:
    """One litellm entry, every cost key accounted for: priced, not admitted, or unpriced."""
    explicit: dict[str, Decimal] = {}
    tiers: dict[int, dict[str, Decimal]] = {}
    unpriced: list[str] = []
    audio_only: str | None = None
    always_searches = any(word in model.lower() for word in _ALWAYS_SEARCHING_NAMES) or (
        entry.get("litellm_provider") in _ALWAYS_SEARCHING_PROVIDERS
    )
    for raw_key, value in entry.items():
        if raw_key in _REFUSED_FEATURE_KEYS and always_searches:
            unpriced.append(raw_key)
            continue
        if (
            "cost" not in raw_key
            or raw_key in _REFUSED_FEATURE_KEYS
            or raw_key.endswith(_NOT_ADMITTED_SUFFIXES)
        ):
            continue
        if raw_key in _AUDIO_INPUT_ONLY_KEYS:
            audio_only = audio_only or raw_key
            continue
        key, threshold = _KEY_SYNONYMS.get(raw_key, raw_key), None
        if (tier := _TIER.fullmatch(key)) is not None:
            key, threshold = tier["key"], int(tier["thousands"]) * 1000
        dimension, amount = _DIMENSION_BY_KEY.get(key), _decimal(value)
        if dimension is None or amount is None:
            unpriced.append(raw_key)
        elif threshold is None:
            explicit.setdefault(dimension, amount)
        else:
            tiers.setdefault(threshold, {})[dimension] = amount
    max_out, max_in = entry.get("max_output_tokens"), entry.get("max_input_tokens")
    return ModelPrice(
        model=model,
        per_token=_with_fallbacks(explicit),
        max_output_tokens=max_out
        if isinstance(max_out, int) and not isinstance(max_out, bool) and max_out > 0
        else None,
        source="litellm",
        max_input_tokens=max_in
        if isinstance(max_in, int) and not isinstance(max_in, bool) and max_in > 0
        else None,
        tiers=tuple(Tier(above, per_token) for above, per_token in sorted(tiers.items())),
        unpriced=tuple(sorted(unpriced)),
        audio_input_unpriced=audio_only,
    )


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
        if not (input_price or output_price):
            continue  # absent, or priced 0: unpriced, never free
        priced = {"input_cost_per_token": 0, "output_cost_per_token": 0, **entry}
        prices[model] = _model_price(model, priced)
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
    "max_input_tokens",
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
        raise PricingError(f'{where}: a price must be a number >= 0, such as "0.15", not {value!r}')
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
            raise PricingError(
                f"{here}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_OVERRIDE_FIELDS)}"
            )
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
        max_in = spec.get("max_input_tokens")
        if max_in is not None and (not isinstance(max_in, int) or isinstance(max_in, bool) or max_in < 1):
            raise PricingError(f"{here}.max_input_tokens must be a whole number >= 1")
        result[model] = ModelPrice.tokens(
            model,
            input_price,
            _per_million(f"{here}.output_per_million_usd", spec["output_per_million_usd"]),
            _per_million(f"{here}.cached_input_per_million_usd", spec["cached_input_per_million_usd"])
            if "cached_input_per_million_usd" in spec
            else None,
            max_output_tokens=max_out,
            max_input_tokens=max_in,
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
