"""The CRDs: every example in crds/examples/ is valid, every bad spec is refused, and the schemas
agree with the operator (defaults, limits, the email rule) so the two can never drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from support import crd_schema

from billing import key_limits, money, settings, wallets
from billing_operator import apikey_reconciler, errors, settings as operator_settings, wallet_reconciler

EXAMPLES = sorted((crd_schema.ROOT / "crds" / "examples").glob("*.yaml"))
BAD_SPECS = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_are_examples_and_bad_specs() -> None:
    assert len(EXAMPLES) >= 4 and len(BAD_SPECS) >= 15
    assert {_load(p)["kind"] for p in EXAMPLES} == {"Wallet", "ApiKey"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_its_crd(path: Path) -> None:
    crd_schema.assert_valid(_load(path))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted_by_the_operator_too(path: Path) -> None:
    obj = _load(path)
    if obj["kind"] == "Wallet":
        wallet_reconciler.WalletSpec.parse(obj["spec"])
    else:
        apikey_reconciler.ApiKeySpec.parse(
            obj["spec"], default_grace_s=operator_settings.ROTATION_GRACE_S_DEFAULT
        )


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda p: p.name)
def test_bad_spec_is_rejected(path: Path) -> None:
    obj = _load(path)
    assert obj["apiVersion"] == "billingproxy.io/v1alpha1" and obj["kind"] in ("Wallet", "ApiKey")
    assert crd_schema.errors(obj), f"{path.name} should be refused by the {obj['kind']} CRD"


def test_the_validator_is_not_vacuous() -> None:
    """A valid object turns invalid by each single change a bad spec makes."""
    good = _load(EXAMPLES[0])
    assert not crd_schema.errors(good)
    assert crd_schema.errors({**good, "spec": {**good["spec"], "ownerEmail": 42}})
    assert crd_schema.errors({**good, "status": {"state": "Bankrupt"}})
    assert crd_schema.errors({**good, "status": {"lastTopUp": {"time": "yesterday"}}})


@pytest.mark.parametrize(
    "kind, plural, short, columns",
    [
        ("Wallet", "wallets", "wal", ["Owner", "Balance", "State", "Age"]),
        ("ApiKey", "apikeys", "ak", ["Wallet", "State", "Prefix", "Age"]),
    ],
)
def test_crd_shape(kind: str, plural: str, short: str, columns: list[str]) -> None:
    crd = crd_schema.crd(kind)
    assert crd["metadata"]["name"] == f"{plural}.billingproxy.io"
    assert crd["spec"]["group"] == "billingproxy.io" and crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == kind and short in crd["spec"]["names"]["shortNames"]
    assert "billingproxy" in crd["spec"]["names"]["categories"]
    version = crd_schema.version(kind)
    assert version["served"] and version["storage"] and version["subresources"] == {"status": {}}
    default_columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert default_columns == columns


@pytest.mark.parametrize(
    "address, valid",
    [
        ("alice@example.com", True),
        ("a.b+tag@sub.example.co.uk", True),
        ("o'brien@example.ie", True),
        ("alice@example", False),
        ("alice-at-example.com", False),
        ("alice@-example.com", False),
        ("al ice@example.com", False),
        ("alice@exa_mple.com", False),
        ("@example.com", False),
    ],
)
def test_email_rule_is_the_cores(address: str, valid: bool) -> None:
    """The CRD refuses at `kubectl apply` exactly what the operator would refuse later."""
    obj = {
        "apiVersion": "billingproxy.io/v1alpha1",
        "kind": "Wallet",
        "metadata": {"name": "w"},
        "spec": {"ownerEmail": address},
    }
    try:
        wallets.normalize_email(address)
        core_accepts = True
    except wallets.EmailInvalid:
        core_accepts = False
    assert core_accepts is valid
    assert (not crd_schema.errors(obj)) is valid


def test_defaults_and_limits_agree_with_the_operator() -> None:
    wallet = crd_schema.version("Wallet")["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    apikey = crd_schema.version("ApiKey")["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    # kmock (and an older CRD) apply no defaults: the operator must fall back to the same values.
    assert wallet["initialGrant"]["default"] == operator_settings.INITIAL_GRANT_USD_DEFAULT
    assert wallet["suspended"]["default"] is False and apikey["suspended"]["default"] is False
    assert apikey["rotationGracePeriodSeconds"]["default"] == operator_settings.ROTATION_GRACE_S_DEFAULT
    assert apikey["rotationGracePeriodSeconds"]["maximum"] == operator_settings.ROTATION_GRACE_S_MAX
    assert apikey["rotationGeneration"]["default"] == 0
    assert apikey["rotationGeneration"]["maximum"] == apikey_reconciler.ROTATION_GENERATION_MAX
    assert apikey["allowedModels"]["maxItems"] == apikey_reconciler.MODELS_MAX
    assert apikey["allowedModels"]["items"]["maxLength"] == apikey_reconciler.MODEL_LENGTH_MAX
    assert apikey["secretName"]["pattern"] == "^" + apikey_reconciler._NAME.pattern + "$"
    # The largest overdraft limit the CRD's USD pattern allows is the core's largest.
    overdraft = wallet["overdraftLimitUsd"]
    assert "default" not in overdraft, "unset means the operator's BILLINGPROXY_OVERDRAFT_LIMIT_USD"
    largest = "9" * 7 + "." + "9" * 9
    assert re.fullmatch(overdraft["pattern"], largest) and not re.fullmatch(
        overdraft["pattern"], "1" + "0" * 7
    )
    assert money.parse_usd(largest) == settings.OVERDRAFT_LIMIT_NANO_MAX
    # A spend limit: the same windows, and the CRD's largest amount is one the core refuses as too
    # large only past its own bound (the operator then names the field).
    spend_limit = apikey["spendLimit"]["properties"]
    assert spend_limit["window"]["enum"] == list(key_limits.WINDOWS)
    assert re.fullmatch(spend_limit["usd"]["pattern"], "9" * 9 + ".99") and not re.fullmatch(
        spend_limit["usd"]["pattern"], "1" * 11
    )


def test_immutable_and_monotonic_fields_have_cel_rules() -> None:
    """What JSON Schema cannot say (a field compared with its old value) is said in CEL."""
    wallet = crd_schema.version("Wallet")["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    apikey = crd_schema.version("ApiKey")["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    rules = {
        ("Wallet", "initialGrant"): "self == oldSelf",
        ("ApiKey", "walletRef"): "self == oldSelf",
        ("ApiKey", "secretName"): "self == oldSelf",
        ("ApiKey", "rotationGeneration"): "self >= oldSelf",
    }
    for (kind, field), rule in rules.items():
        props = wallet if kind == "Wallet" else apikey
        found = [v["rule"] for v in props[field].get("x-kubernetes-validations", [])]
        assert found == [rule], f"{kind}.spec.{field}"


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"ownerEmail": "not-an-email"}, "spec.ownerEmail"),
        ({"ownerEmail": "a@example.com", "initialGrant": "ten"}, "spec.initialGrant"),
        ({"ownerEmail": "a@example.com", "lowBalanceThreshold": 5}, "spec.lowBalanceThreshold"),
        ({"ownerEmail": "a@example.com", "stripeCustomerId": "acct_1"}, "spec.stripeCustomerId"),
        ({"ownerEmail": "a@example.com", "overdraftLimitUsd": "-1"}, "spec.overdraftLimitUsd"),
        ({"ownerEmail": "a@example.com", "overdraftLimitUsd": "10000000"}, "spec.overdraftLimitUsd"),
    ],
)
def test_operator_names_the_bad_wallet_field(spec: dict, field: str) -> None:
    with pytest.raises(errors.InvalidSpec, match=field):
        wallet_reconciler.WalletSpec.parse(spec)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"secretName": "k"}, "spec.walletRef.name"),
        ({"walletRef": {"name": "w"}, "secretName": "Bad_Name"}, "spec.secretName"),
        ({"walletRef": {"name": "w"}, "secretName": "k", "expiresAt": "2027-01-01"}, "spec.expiresAt"),
        ({"walletRef": {"name": "w"}, "secretName": "k", "allowedModels": []}, "spec.allowedModels"),
        (
            {"walletRef": {"name": "w"}, "secretName": "k", "rotationGeneration": -1},
            "spec.rotationGeneration",
        ),
        (
            {"walletRef": {"name": "w"}, "secretName": "k", "rotationGracePeriodSeconds": True},
            "spec.rotationGracePeriodSeconds",
        ),
        ({"walletRef": {"name": "w"}, "secretName": "k", "spendLimit": "5.00"}, "spec.spendLimit"),
        (
            {"walletRef": {"name": "w"}, "secretName": "k", "spendLimit": {"usd": 5.0, "window": "daily"}},
            "spec.spendLimit.usd",
        ),
        (
            {"walletRef": {"name": "w"}, "secretName": "k", "spendLimit": {"usd": "5", "window": "hourly"}},
            "spec.spendLimit.window",
        ),
    ],
)
def test_operator_names_the_bad_apikey_field(spec: dict, field: str) -> None:
    with pytest.raises(errors.InvalidSpec, match=field):
        apikey_reconciler.ApiKeySpec.parse(spec, default_grace_s=60)
