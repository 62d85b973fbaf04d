"""billing.pricing: litellm's price map read exactly, overrides, markup, and one rounding up.

Expected costs are worked out by hand from the documented per-token prices, in Decimal.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import pytest

from billing import pricing
from billing.usage import Usage

MILLION = Decimal(1_000_000)


@pytest.fixture(scope="module")
def litellm_prices() -> dict[str, pricing.ModelPrice]:
    return pricing.load_litellm_prices()


def price(
    input_usd: str, output_usd: str, cached_usd: str | None = None, model: str = "m"
) -> pricing.ModelPrice:
    return pricing.ModelPrice.tokens(
        model,
        Decimal(input_usd),
        Decimal(output_usd),
        None if cached_usd is None else Decimal(cached_usd),
        source="test",
    )


# --- litellm's map ------------------------------------------------------------------------------


def test_gpt_4o_mini_prices_are_exact_decimals(litellm_prices: dict[str, pricing.ModelPrice]) -> None:
    mini = litellm_prices["gpt-4o-mini"]
    for value in (mini.input_usd_per_token, mini.output_usd_per_token, mini.cached_input_usd_per_token):
        assert type(value) is Decimal
    assert mini.input_usd_per_token == Decimal("1.5e-07")
    assert mini.output_usd_per_token == Decimal("6e-07")
    assert mini.cached_input_usd_per_token == Decimal("7.5e-08")
    # A float read would be 1.49999999999999993e-07, which no Decimal literal of 1.5e-07 equals.
    assert mini.input_usd_per_token != Decimal(1.5e-07)
    assert mini.max_output_tokens == 16384
    assert mini.source == "litellm"


def test_gemini_flash_is_priced(litellm_prices: dict[str, pricing.ModelPrice]) -> None:
    flash = litellm_prices["gemini/gemini-2.5-flash"]
    assert flash.input_usd_per_token > 0 and flash.output_usd_per_token > 0


def test_whole_map_priced_iff_some_token_price_is_positive(
    litellm_prices: dict[str, pricing.ModelPrice],
) -> None:
    raw = json.loads(pricing._price_map_path().read_text(encoding="utf-8"), parse_float=Decimal)
    expected = set()
    for model, entry in raw.items():
        if model == "sample_spec" or not isinstance(entry, dict):
            continue
        token_prices = [entry.get("input_cost_per_token"), entry.get("output_cost_per_token")]
        if any(isinstance(p, (int, Decimal)) and not isinstance(p, bool) and p > 0 for p in token_prices):
            expected.add(model)
    assert set(litellm_prices) == expected
    assert len(expected) > 1000
    # The map does hold zero-priced models; they must be unpriced, not free.
    zero_priced = [
        m
        for m, e in raw.items()
        if isinstance(e, dict) and e.get("input_cost_per_token") == 0 and e.get("output_cost_per_token") == 0
    ]
    assert zero_priced
    assert not set(zero_priced) & set(litellm_prices)


def test_price_map_rules_on_a_small_file(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(
        """{
          "sample_spec": {"input_cost_per_token": 0.1, "output_cost_per_token": 0.2},
          "free": {"input_cost_per_token": 0, "output_cost_per_token": 0.0},
          "no-prices": {"max_tokens": 10},
          "not-a-dict": [1, 2],
          "negative": {"input_cost_per_token": -0.000001, "output_cost_per_token": -0.000002},
          "input-only": {"input_cost_per_token": 0.000000123456789},
          "full": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,
                   "cache_read_input_token_cost": 1e-07, "max_output_tokens": 100},
          "bad-limit": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,
                        "max_output_tokens": "lots"}
        }""",
        encoding="utf-8",
    )
    prices = pricing.load_litellm_prices(path)
    assert set(prices) == {"input-only", "full", "bad-limit"}
    assert prices["input-only"].input_usd_per_token == Decimal("0.000000123456789")
    assert prices["input-only"].output_usd_per_token == 0
    assert prices["input-only"].cached_input_usd_per_token == Decimal("0.000000123456789")
    assert prices["full"].cached_input_usd_per_token == Decimal("1e-07")
    assert prices["full"].max_output_tokens == 100
    assert prices["bad-limit"].max_output_tokens is None


def test_unknown_model_is_unpriced() -> None:
    book = pricing.PriceBook({"m": price("1", "1")})
    assert book.price("no-such-model") is None
    assert book.price("m") is not None
    assert len(book) == 1


# --- cost ---------------------------------------------------------------------------------------


def test_cost_of_gpt_4o_mini_with_cached_tokens(litellm_prices: dict[str, pricing.ModelPrice]) -> None:
    book = pricing.PriceBook(litellm_prices)
    usage = Usage.tokens(prompt_tokens=1000, completion_tokens=500, cached_tokens=200)
    # 800 × 1.5e-7 + 200 × 7.5e-8 + 500 × 6e-7 = 0.00012 + 0.000015 + 0.0003 = 0.000435 USD
    expected_usd = 800 * Decimal("1.5e-7") + 200 * Decimal("7.5e-8") + 500 * Decimal("6e-7")
    assert expected_usd == Decimal("0.000435")
    assert book.cost_nano(litellm_prices["gpt-4o-mini"], usage) == 435_000


def test_cost_without_cache(litellm_prices: dict[str, pricing.ModelPrice]) -> None:
    book = pricing.PriceBook(litellm_prices)
    mini = litellm_prices["gpt-4o-mini"]
    assert book.cost_nano(mini, Usage.tokens(prompt_tokens=10, completion_tokens=20)) == 1_500 + 12_000
    assert book.cost_nano(mini, Usage.tokens(prompt_tokens=0, completion_tokens=0)) == 0


@pytest.mark.parametrize(
    ("markup", "expected_nano"),
    [
        ("0", 435_000),
        ("20", 522_000),  # × 1.2
        ("12.5", 489_375),  # × 1.125
        ("100", 870_000),
        ("0.0001", 435_001),  # 435 000.435 → rounded up
    ],
)
def test_markup_is_applied_before_the_one_rounding(
    litellm_prices: dict[str, pricing.ModelPrice], markup: str, expected_nano: int
) -> None:
    book = pricing.PriceBook(litellm_prices, Decimal(markup))
    usage = Usage.tokens(prompt_tokens=1000, completion_tokens=500, cached_tokens=200)
    assert book.cost_nano(litellm_prices["gpt-4o-mini"], usage) == expected_nano
    assert book.markup_percent == Decimal(markup)


@pytest.mark.parametrize(
    ("model_price", "usage", "expected_nano"),
    [
        # 0.15 nano per input token
        (price("1.5e-10", "0"), Usage.tokens(1, 0), 1),
        (price("1.5e-10", "0"), Usage.tokens(3, 0), 1),  # 0.45 → 1
        (price("1.5e-10", "0"), Usage.tokens(10, 0), 2),  # 1.5 → 2
        (price("1.5e-10", "0"), Usage.tokens(20, 0), 3),  # exactly 3: no rounding
        # 0.4 + 0.4 = 0.8 nano → 1. Rounding each part up first would give 2.
        (price("4e-10", "4e-10"), Usage.tokens(1, 1), 1),
        # 0.4 uncached + 0.1 cached + 0.4 output = 0.9 → 1 (per part: 3)
        (price("4e-10", "4e-10", "1e-10"), Usage.tokens(2, 1, cached_tokens=1), 1),
        # A nano-fraction far below the ninth decimal still costs a whole nano.
        (price("1e-30", "0"), Usage.tokens(1, 0), 1),
    ],
)
def test_cost_is_rounded_up_once(model_price: pricing.ModelPrice, usage: Usage, expected_nano: int) -> None:
    assert pricing.PriceBook({}).cost_nano(model_price, usage) == expected_nano


def test_markup_on_a_fraction_is_rounded_once() -> None:
    half_nano = price("5e-10", "0")
    # 0.5 nano × 2 = exactly 1 nano. Rounding before the markup would give 1 × 2 = 2.
    assert pricing.PriceBook({}, Decimal(100)).cost_nano(half_nano, Usage.tokens(1, 0)) == 1
    # 10 nano × 1.0001 = 10.001 → 11.
    ten_nano = price("1e-8", "0")
    assert pricing.PriceBook({}, Decimal("0.01")).cost_nano(ten_nano, Usage.tokens(1, 0)) == 11


def test_large_usage_stays_exact() -> None:
    model_price = price("0.000000123456789", "0.000000987654321")
    usage = Usage.tokens(prompt_tokens=10**12 + 7, completion_tokens=3 * 10**11 + 1)
    expected = (
        (10**12 + 7) * 123 + (10**12 + 7) * Decimal("0.456789") + (3 * 10**11 + 1) * Decimal("987.654321")
    )  # in nano-USD
    assert expected != expected.to_integral_value()
    assert pricing.PriceBook({}).cost_nano(model_price, usage) == math.ceil(expected)


def test_hold_assumes_no_cache_and_the_full_output_budget(
    litellm_prices: dict[str, pricing.ModelPrice],
) -> None:
    book = pricing.PriceBook(litellm_prices)
    mini = litellm_prices["gpt-4o-mini"]
    # 1000 × 1.5e-7 + 16384 × 6e-7 = 0.00015 + 0.0098304 = 0.0099804 USD
    assert book.hold_nano(mini, prompt_tokens=1000, max_output_tokens=16384) == 9_980_400


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt_tokens": -1, "completion_tokens": 0},
        {"prompt_tokens": 0, "completion_tokens": -1},
        {"prompt_tokens": 1, "completion_tokens": 0, "cached_tokens": -1},
        {"prompt_tokens": 1, "completion_tokens": 0, "cached_tokens": 2},
        {"prompt_tokens": True, "completion_tokens": 0},
        {"prompt_tokens": 1.0, "completion_tokens": 0},
        {"prompt_tokens": "1", "completion_tokens": 0},
    ],
)
def test_usage_refuses_impossible_counts(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Usage.tokens(**kwargs)


def test_prompt_tokens_bound_is_one_token_per_byte() -> None:
    # "a a a …": every " a" is its own token for byte-level BPE, two bytes each; a bound of
    # bytes ÷ 3 would undercount it and let strict mode go below zero.
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a " * 3000}]})
    assert pricing.prompt_tokens_bound(len(body.encode())) >= 3000 + 3
    assert pricing.prompt_tokens_bound(0) == 0


# --- overrides ----------------------------------------------------------------------------------

OVERRIDES = """\
models:
  my-model:
    input_per_million_usd: 0.15
    output_per_million_usd: 0.6
    cached_input_per_million_usd: 0.075
    max_output_tokens: 8192
  quoted:
    input_per_million_usd: "0.1"
    output_per_million_usd: 3
  gpt-4o-mini:
    input_per_million_usd: 0.3
    output_per_million_usd: 1.2
  my-alias:
    alias_of: my-model
  mini-alias:
    alias_of: gpt-4o-mini
  gemini-alias:
    alias_of: gemini/gemini-2.5-flash
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "overrides.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_overrides_are_read_exactly(tmp_path: Path) -> None:
    book = pricing.load(write(tmp_path, OVERRIDES))
    mine = book.price("my-model")
    assert mine is not None
    assert mine.source == "override"
    assert mine.max_output_tokens == 8192
    for value in (mine.input_usd_per_token, mine.output_usd_per_token, mine.cached_input_usd_per_token):
        assert type(value) is Decimal
    # Per million in the file, per token in the book: 0.15 / 1e6, exactly.
    assert mine.input_usd_per_token * MILLION == Decimal("0.15")
    assert mine.input_usd_per_token == Decimal("1.5e-7")
    assert mine.output_usd_per_token == Decimal("6e-7")
    assert mine.cached_input_usd_per_token == Decimal("7.5e-8")
    # The float 0.15 is 0.1499999999999999944…; a float anywhere on the way would show here.
    assert mine.input_usd_per_token != Decimal(0.15) / MILLION

    quoted = book.price("quoted")
    assert quoted is not None
    assert quoted.input_usd_per_token == Decimal("1e-7")
    assert quoted.output_usd_per_token == Decimal("3e-6")
    assert quoted.cached_input_usd_per_token == quoted.input_usd_per_token
    assert quoted.max_output_tokens is None

    # One million input tokens of my-model cost exactly 0.15 USD.
    assert book.cost_nano(mine, Usage.tokens(prompt_tokens=1_000_000, completion_tokens=0)) == 150_000_000


def test_override_replaces_a_litellm_price_and_keeps_the_rest(tmp_path: Path) -> None:
    book = pricing.load(write(tmp_path, OVERRIDES))
    mini = book.price("gpt-4o-mini")
    assert mini is not None and mini.source == "override"
    assert mini.input_usd_per_token == Decimal("3e-7")
    assert mini.output_usd_per_token == Decimal("1.2e-6")
    # An override without a cached price charges cached tokens at the input price.
    assert mini.cached_input_usd_per_token == Decimal("3e-7")
    assert mini.max_output_tokens is None
    untouched = book.price("gpt-4o")
    assert untouched is not None and untouched.source == "litellm"
    assert len(book) == len(pricing.load_litellm_prices()) + 5  # my-model, quoted, 3 aliases


def test_aliases_share_their_targets_price(tmp_path: Path) -> None:
    book = pricing.load(write(tmp_path, OVERRIDES))
    alias, target = book.price("my-alias"), book.price("my-model")
    assert alias is not None and target is not None
    assert alias.model == "my-alias"
    assert alias.source == "override"
    assert (alias.input_usd_per_token, alias.output_usd_per_token, alias.cached_input_usd_per_token) == (
        target.input_usd_per_token,
        target.output_usd_per_token,
        target.cached_input_usd_per_token,
    )
    assert alias.max_output_tokens == 8192
    # An alias of an overridden litellm model follows the override, not litellm's price.
    mini_alias = book.price("mini-alias")
    assert mini_alias is not None and mini_alias.input_usd_per_token == Decimal("3e-7")
    gemini = book.price("gemini-alias")
    assert gemini is not None
    assert (
        gemini.input_usd_per_token
        == pricing.load_litellm_prices()["gemini/gemini-2.5-flash"].input_usd_per_token
    )


def test_markup_passed_to_load(tmp_path: Path) -> None:
    book = pricing.load(write(tmp_path, OVERRIDES), markup_percent=Decimal("20"))
    mine = book.price("my-model")
    assert mine is not None
    # 1e6 × 1.5e-7 × 1.2 = 0.18 USD
    assert book.cost_nano(mine, Usage.tokens(prompt_tokens=1_000_000, completion_tokens=0)) == 180_000_000


@pytest.mark.parametrize("text", ["", "# nothing\n", "models:\n", "models: {}\n"])
def test_empty_overrides_change_nothing(tmp_path: Path, text: str) -> None:
    book = pricing.load(write(tmp_path, text))
    assert len(book) == len(pricing.load_litellm_prices())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models:\n  m: {input_per_million_usd: 1, output_per_million_usd: 1, colour: red}\n", "colour"),
        ("models:\n  m: {input_per_million: 1, output_per_million_usd: 1}\n", "input_per_million"),
        ("models:\n  m: {output_per_million_usd: 1}\n", "input_per_million_usd is required"),
        ("models:\n  m: {input_per_million_usd: 1}\n", "output_per_million_usd is required"),
        ("models:\n  m: {input_per_million_usd: -0.1, output_per_million_usd: 1}\n", "input_per_million_usd"),
        ("models:\n  m: {input_per_million_usd: 1, output_per_million_usd: -3}\n", "output_per_million_usd"),
        (
            "models:\n  m: {input_per_million_usd: 1, output_per_million_usd: 1, "
            "cached_input_per_million_usd: -1}\n",
            "cached_input_per_million_usd",
        ),
        ("models:\n  m: {input_per_million_usd: abc, output_per_million_usd: 1}\n", "input_per_million_usd"),
        (
            "models:\n  m: {input_per_million_usd: 'NaN', output_per_million_usd: 1}\n",
            "input_per_million_usd",
        ),
        ("models:\n  m: {input_per_million_usd: true, output_per_million_usd: 1}\n", "input_per_million_usd"),
        ("models:\n  m: {input_per_million_usd: .inf, output_per_million_usd: 1}\n", "inf"),
        ("models:\n  m: {input_per_million_usd: .nan, output_per_million_usd: 1}\n", "nan"),
        (
            "models:\n  m: {input_per_million_usd: 1, output_per_million_usd: 1, max_output_tokens: 0}\n",
            "max_output_tokens",
        ),
        (
            "models:\n  m: {input_per_million_usd: 1, output_per_million_usd: 1, max_output_tokens: many}\n",
            "max_output_tokens",
        ),
        ("models:\n  m: {alias_of: no-such-model}\n", "no-such-model"),
        ("models:\n  m: {alias_of: gpt-4o-mini, input_per_million_usd: 1}\n", "alias_of"),
        ("models:\n  m: {alias_of: 42}\n", "alias_of"),
        ("models:\n  a: {alias_of: b}\n  b: {alias_of: gpt-4o-mini}\n", "models.a"),
        ("models:\n  m: 0.15\n", "models.m"),
        ("models: [a, b]\n", "models"),
        ("prices:\n  m: {input_per_million_usd: 1, output_per_million_usd: 1}\n", "models"),
        ("- 1\n- 2\n", "models"),
        ("models: {m: [unclosed\n", "cannot read"),
    ],
)
def test_bad_overrides_are_refused_with_a_message_saying_where(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(pricing.PricingError, match=message) as caught:
        pricing.load(path)
    assert str(path) in str(caught.value)


def test_missing_override_file(tmp_path: Path) -> None:
    with pytest.raises(pricing.PricingError, match="cannot read"):
        pricing.load(tmp_path / "absent.yaml")


# --- every dimension (issue 10, finding 3) --------------------------------------------------------


def test_every_cost_key_of_the_map_is_priced_refused_or_named(
    litellm_prices: dict[str, pricing.ModelPrice],
) -> None:
    image = litellm_prices["gpt-image-1"]
    # Image tokens cost $40/M output: never billed $0 — the model is refused, naming the key.
    assert image.unpriced_for({"input_text", "output_text"}) == "cache_read_input_image_token_cost"
    assert litellm_prices["gpt-4o-mini"].unpriced_for({"input_text", "input_cached", "output_text"}) is None


def test_anthropic_cache_writes_and_reads_are_priced(litellm_prices: dict[str, pricing.ModelPrice]) -> None:
    sonnet = litellm_prices["claude-sonnet-4-5"]
    book = pricing.PriceBook(litellm_prices)
    usage = Usage(
        input_text=1000,
        input_cached=20_000,
        input_cache_write_5m=30_000,
        input_cache_write_1h=4000,
        output_text=500,
    )
    # 1000 × 3e-6 + 20000 × 3e-7 + 30000 × 3.75e-6 + 4000 × 6e-6 + 500 × 1.5e-5
    expected = Decimal("0.003") + Decimal("0.006") + Decimal("0.1125") + Decimal("0.024") + Decimal("0.0075")
    assert book.cost_nano(sonnet, usage) == int(expected * 10**9) == 153_000_000


def test_audio_is_priced_at_its_own_rate_or_refused(litellm_prices: dict[str, pricing.ModelPrice]) -> None:
    flash = litellm_prices["gemini/gemini-2.5-flash"]
    book = pricing.PriceBook(litellm_prices)
    assert book.cost_nano(flash, Usage(input_audio=1_000_000)) == 1_000_000_000  # $1/M audio, not $0.30/M
    # Its cached audio has a price of its own the gateway does not bill: audio input is refused.
    assert flash.unpriced_for({"input_text", "input_audio"}) == "cache_read_input_audio_token_cost"
    mini = litellm_prices["gpt-4o-mini"]
    assert mini.unpriced_for({"input_text", "output_audio"}) == "output_cost_per_audio_token"
    with pytest.raises(pricing.UnpricedUsage):
        book.cost_nano(mini, Usage(output_audio=1))


def test_reasoning_has_its_own_rate_when_the_map_gives_one(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(
        '{"r": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,'
        ' "output_cost_per_reasoning_token": 5e-06}}',
        encoding="utf-8",
    )
    r = pricing.load_litellm_prices(path)["r"]
    assert pricing.PriceBook({}).cost_nano(r, Usage(output_text=1, output_reasoning=1)) == 7_000


def test_long_context_tiers_price_the_whole_request(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(
        '{"t": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06,'
        ' "input_cost_per_token_above_200k_tokens": 3e-06, "output_cost_per_token_above_200k_tokens": 4e-06,'
        ' "input_cost_per_token_above_200k_tokens_priority": 9e-06, "unknown_cost_per_widget": 1}}',
        encoding="utf-8",
    )
    t = pricing.load_litellm_prices(path)["t"]
    book = pricing.PriceBook({})
    assert book.cost_nano(t, Usage(input_text=200_000, output_text=1)) == 200_000 * 1_000 + 2_000
    assert book.cost_nano(t, Usage(input_text=200_001, output_text=1)) == 200_001 * 3_000 + 4_000
    # The hold takes the higher tier whatever the prompt: the bound holds either side of it.
    assert book.hold_nano(t, prompt_tokens=1, max_output_tokens=1) == 3_000 + 4_000
    assert t.unpriced == ("unknown_cost_per_widget",)  # never billed $0: the model is refused


def test_hold_is_the_highest_rate_of_the_dimensions_the_endpoint_can_carry(
    litellm_prices: dict[str, pricing.ModelPrice],
) -> None:
    sonnet = litellm_prices["claude-sonnet-4-5"]
    book = pricing.PriceBook(litellm_prices)
    anthropic = {"input_text", "input_cached", "input_cache_write_5m", "input_cache_write_1h", "output_text"}
    # Every prompt token may be a 1-hour cache write (6e-6), not plain input (3e-6).
    assert book.hold_nano(sonnet, prompt_tokens=1000, max_output_tokens=0, dimensions=anthropic) == 6_000_000


def test_largest_output_that_fits_a_budget(litellm_prices: dict[str, pricing.ModelPrice]) -> None:
    mini = litellm_prices["gpt-4o-mini"]
    book = pricing.PriceBook(litellm_prices)
    dims = {"input_text", "output_text"}
    budget = 10_000_000  # $0.01
    fit = book.output_within(mini, budget, prompt_tokens=1000, choices=2, dimensions=dims)
    assert book.hold_nano(mini, prompt_tokens=1000, max_output_tokens=2 * fit, dimensions=dims) <= budget
    assert book.hold_nano(mini, prompt_tokens=1000, max_output_tokens=2 * (fit + 1), dimensions=dims) > budget
    assert book.output_within(mini, 0, prompt_tokens=1000, choices=1, dimensions=dims) == 0
