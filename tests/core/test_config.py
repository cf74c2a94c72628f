"""The configuration: the built-in default (gateway/defaults/gateway.toml) loads, and every mistake is an error naming its key.

``load_config`` is pure, so every test passes the TOML and the environment it means.
"""

from __future__ import annotations

from datetime import time

import msgspec
import msgspec.inspect as mi
import pytest

from adapters.fcm import FcmSettings
from adapters.registry import SPECS
from adapters.sendgrid import SendgridSettings
from adapters.twilio import TwilioSettings
from adapters.viber import ViberSettings
from gateway.config import (
    SECRET_KEYS,
    ChannelConfig,
    GatewayConfig,
    Secret,
    Synchronous,
    _dotted,
    default_config_bytes,
    load_config,
    policy_rules,
)
from gateway.core.caps import CapAction, CapRule
from gateway.core.consent import ConsentDefaults
from gateway.core.control_group import ControlGroup
from gateway.core.errors import ConfigError
from gateway.core.model import DEFAULT_CASCADE, Category, Channel
from gateway.core.policy import PolicyRules, QuietAction, QuietRule
from gateway.core.quiet_hours import QuietWindow
from gateway.core.retry import RetryPolicy

GATEWAY_TOML = default_config_bytes()

# A small valid config the error tables below break one key at a time.
TENANT = b"""
[providers.sms_main]
kind = "twilio"
url = "https://api.twilio.example"

[tenants.acme]
brand = "Acme"
cascade = ["sms"]
providers = { sms = ["sms_main"] }
"""


def load(toml: bytes = b"", **environ: str) -> GatewayConfig:
    return load_config(toml, environ)


def error_of(toml: bytes, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(toml, environ or {})
    return str(info.value)


class TestDefaultConfig:
    """The built-in default config loads and means what it says."""

    def test_loads_without_environment(self) -> None:
        config = load_config(GATEWAY_TOML, {})

        assert Synchronous.FULL == config.store.synchronous
        assert {"fcm_sim", "sendgrid_sim", "viber_sim", "twilio_sim"} == set(config.providers)
        assert all(provider.simulated for provider in config.providers.values())
        assert ["demo"] == list(config.tenants)
        assert ("Demo Shop", DEFAULT_CASCADE) == (
            config.tenants["demo"].brand,
            config.tenants["demo"].cascade,
        )
        expected_providers = {
            Channel.PUSH: ("fcm_sim",),
            Channel.EMAIL: ("sendgrid_sim",),
            Channel.VIBER: ("viber_sim",),
            Channel.SMS: ("twilio_sim",),
        }
        assert expected_providers == config.tenants["demo"].providers
        assert config.tracking.secret is None

    def test_step_timeouts(self) -> None:
        expected = {
            Channel.PUSH: 300.0,
            Channel.EMAIL: 3600.0,
            Channel.VIBER: 1800.0,
            Channel.SMS: 86400.0,
        }

        assert expected == load_config(GATEWAY_TOML, {}).step_timeouts()

    def test_policy_rules_for_demo(self) -> None:
        expected = PolicyRules(
            consent_defaults=ConsentDefaults(personal_data=True, advertising=False),
            control_group=ControlGroup(percent=5.0, period_seconds=90 * 86400.0, salt="demo-2026"),
            caps=(
                CapRule(
                    name="promo_weekly",
                    max_count=3,
                    window_seconds=604800.0,
                    categories=frozenset({Category.PROMO}),
                    action=CapAction.REJECT,
                ),
                CapRule(
                    name="marketing_daily",
                    max_count=2,
                    window_seconds=86400.0,
                    action=CapAction.DEFER,
                ),
            ),
            quiet_hours=(
                QuietRule(
                    window=QuietWindow(time(21, 0), time(9, 0)),
                    action=QuietAction.DEFER,
                    categories=frozenset(
                        {Category.INFORMATIONAL, Category.CONTENT, Category.PROMO}
                    ),
                ),
            ),
            critical_service_bypasses_quiet_hours=True,
        )

        assert expected == load_config(GATEWAY_TOML, {}).policy_rules("demo")

    def test_tenant_policy_replaces_the_default_policy(self) -> None:
        config = load(
            TENANT
            + b"""
[tenants.acme.policy.control_group]
percent = 7.0
"""
        )

        assert 7.0 == config.policy_rules("acme").control_group.percent
        assert policy_rules(config.policy) == PolicyRules()

    def test_empty_file_gives_the_defaults(self) -> None:
        config = load_config(b"", {"HOME": "/home/ann"})
        data_dir = "/home/ann/.local/state/cascadegw"
        store = msgspec.structs.replace(
            GatewayConfig().store, data_dir=data_dir, path=f"{data_dir}/cascadegw.db"
        )

        assert msgspec.structs.replace(GatewayConfig(), store=store) == config
        assert ChannelConfig(unread_timeout_seconds=300.0) == config.channels[Channel.PUSH]
        assert isinstance(config.dispatch.retry, RetryPolicy)  # what the dispatcher takes


class TestDataDirectory:
    """The journal lives in a data directory, never where a command happens to start."""

    @pytest.mark.parametrize(
        ("environ", "toml", "expected"),
        [
            ({"HOME": "/home/ann"}, b"", "/home/ann/.local/state/cascadegw/cascadegw.db"),
            (
                {"HOME": "/home/ann", "XDG_STATE_HOME": "/xdg"},
                b"",
                "/xdg/cascadegw/cascadegw.db",
            ),
            (
                {"HOME": "/home/ann", "STATE_DIRECTORY": "/var/lib/cascadegw:/other"},
                b"",
                "/var/lib/cascadegw/cascadegw.db",
            ),
            ({}, b"", "/var/lib/cascadegw/cascadegw.db"),
            ({"HOME": "/h"}, b'[store]\ndata_dir = "/srv/cg"', "/srv/cg/cascadegw.db"),
            ({"HOME": "/h"}, b'[store]\npath = "j/x.db"', "/h/.local/state/cascadegw/j/x.db"),
            ({"HOME": "/h"}, b'[store]\npath = "/abs/x.db"', "/abs/x.db"),
            (
                {"HOME": "/h", "CASCADEGW__STORE__DATA_DIR": "/env"},
                b"",
                "/env/cascadegw.db",
            ),
        ],
        ids=["home", "xdg", "systemd", "nothing", "configured", "relative", "absolute", "env"],
    )
    def test_where_the_journal_goes(
        self, environ: dict[str, str], toml: bytes, expected: str
    ) -> None:
        assert expected == load_config(toml, environ).store.path

    def test_a_relative_data_dir_is_refused(self) -> None:
        with pytest.raises(ConfigError, match=r"store\.data_dir = 'var': must be an absolute path"):
            load_config(b'[store]\ndata_dir = "var"', {})


UNKNOWN_KEYS: dict[str, tuple[bytes, str]] = {
    "top level": (b"curency = 'RUB'", "config: Object contains unknown field `curency`"),
    "nested": (
        b"[store]\nsynchronus = 'normal'",
        "config: store: Object contains unknown field `synchronus`",
    ),
    "deeper": (
        b"[policy.control_group]\npercnt = 5",
        "config: policy.control_group: Object contains unknown field `percnt`",
    ),
    "in an array of tables": (
        b"[[policy.quiet_hours]]\nstart = 21:00:00\nend = 09:00:00\nchanel = 'sms'",
        "config: policy.quiet_hours[0]: Object contains unknown field `chanel`",
    ),
    "inside a tenant": (
        TENANT + b"brnad = 'Acme'",
        "config: tenants.acme: Object contains unknown field `brnad`",
    ),
    "inside a tenant's sender": (
        TENANT + b"[tenants.acme.sender]\nsms_form = 'ACME'",
        "config: tenants.acme.sender: Object contains unknown field `sms_form`",
    ),
    "inside a provider": (
        TENANT.replace(b'kind = "twilio"', b'kind = "twilio"\nregion = "eu"'),
        "config: providers.sms_main: Object contains unknown field `region`",
    ),
    "inside a channel": (
        b"[channels.push]\nunread_timeout_seconds = 1\ntimeout = 2",
        "config: channels.push: Object contains unknown field `timeout`",
    ),
    "inside the retry policy": (
        b"[dispatch.retry]\nattempts = 5",
        "config: dispatch.retry: Object contains unknown field `attempts`",
    ),
    "unknown channel": (
        b"[channels.fax]\nunread_timeout_seconds = 1",
        "config: channels.fax: Invalid enum value 'fax'",
    ),
}


class TestUnknownKeys:
    """A key the config does not define is an error naming it, at any depth."""

    @pytest.mark.parametrize(("toml", "expected"), UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS.keys())
    def test_unknown_key(self, toml: bytes, expected: str) -> None:
        assert expected == error_of(toml)


def two_variants(first: bytes, second: bytes) -> bytes:
    """Experiment ``x`` of tenant acme with variants ``a`` and ``b`` of these weights."""
    return (
        b"[[tenants.acme.experiments.x.variants]]\nname = 'a'\nweight = " + first + b"\n"
        b"[[tenants.acme.experiments.x.variants]]\nname = 'b'\nweight = " + second + b"\n"
    )


IMPOSSIBLE: dict[str, tuple[bytes, str]] = {
    "negative unread timeout": (
        b"[channels.email]\nunread_timeout_seconds = -1",
        "config: channels.email.unread_timeout_seconds: Expected `float` > 0.0",
    ),
    "zero provider timeout": (
        TENANT.replace(b'kind = "twilio"', b'kind = "twilio"\ntimeout_seconds = 0'),
        "config: providers.sms_main.timeout_seconds: Expected `float` > 0.0",
    ),
    "negative retention": (
        b"[store]\nidempotency_retention_seconds = -5",
        "config: store.idempotency_retention_seconds: Expected `float` > 0.0",
    ),
    "percent over 100": (
        b"[policy.control_group]\npercent = 100.5",
        "config: policy.control_group.percent: Expected `float` <= 100.0",
    ),
    "tenant percent over 100": (
        TENANT + b"[tenants.acme.policy.control_group]\npercent = 101",
        "config: tenants.acme.policy.control_group.percent: Expected `float` <= 100.0",
    ),
    "probability over 1": (
        b"[simulator]\nread_probability = 1.5",
        "config: simulator.read_probability: Expected `float` <= 1.0",
    ),
    "quiet window start == end": (
        b"[[policy.quiet_hours]]\nstart = 21:00:00\nend = 21:00:00",
        "policy.quiet_hours[0]: start and end must differ",
    ),
    "tenant quiet window start == end": (
        TENANT + b"[[tenants.acme.policy.quiet_hours]]\nstart = 08:00:00\nend = 08:00:00",
        "tenants.acme.policy.quiet_hours[0]: start and end must differ",
    ),
    "quiet window with a zone": (
        b"[[policy.quiet_hours]]\nstart = '21:00:00+03:00'\nend = 09:00:00",
        "config: policy.quiet_hours[0].start: Expected `time` with no timezone component",
    ),
    "empty send window": (
        b"[[policy.send_windows]]\nwindows = [{ start = 09:00:00, end = 09:00:00 }]",
        "policy.send_windows[0].windows: a window from 09:00:00 to 09:00:00 is empty: start "
        "and end must differ",
    ),
    "no send window": (
        b"[[policy.send_windows]]\nwindows = []",
        "policy.send_windows[0].windows: a send window set needs at least one window",
    ),
    "send window for service": (
        b"[[policy.send_windows]]\ncategories = ['service']\n"
        b"windows = [{ start = 09:00:00, end = 11:00:00 }]",
        "policy.send_windows[0].categories: service messages ignore send windows (a receipt "
        "or a code goes when it is due); leave service out",
    ),
    "send window inside quiet hours": (
        b"[[policy.quiet_hours]]\nstart = 21:00:00\nend = 09:00:00\n"
        b"[[policy.send_windows]]\ncategories = ['promo']\n"
        b"windows = [{ start = 22:00:00, end = 23:00:00 }]",
        "policy.send_windows[0].windows: every window lies in the quiet hours of promo "
        "messages on every channel, so none could ever be sent; move the windows or the "
        "quiet hours",
    ),
    "experiment with one variant": (
        TENANT + b"[[tenants.acme.experiments.x.variants]]\nname = 'a'",
        "tenants.acme.experiments.x.variants: an experiment needs at least two variants",
    ),
    "experiment with twin variants": (
        TENANT
        + b"[[tenants.acme.experiments.x.variants]]\nname = 'a'\n"
        + b"[[tenants.acme.experiments.x.variants]]\nname = 'a'",
        "tenants.acme.experiments.x.variants: variant names must be unique",
    ),
    "experiment with no variants": (
        TENANT + b"[tenants.acme.experiments.x]\nvariants = []",
        "tenants.acme.experiments.x.variants: an experiment needs at least two variants",
    ),
    "experiment without variants": (
        TENANT + b"[tenants.acme.experiments.x]\nsalt = 's'",
        "config: tenants.acme.experiments.x: Object missing required field `variants`",
    ),
    "experiment weight of inf": (
        TENANT + two_variants(b"inf", b"1"),
        "config: tenants.acme.experiments.x.variants[0].weight: Expected `float` <= 1000000.0",
    ),
    "experiment weight of nan": (
        TENANT + two_variants(b"1", b"nan"),
        "config: tenants.acme.experiments.x.variants[1].weight: Expected `float` >= 1e-06",
    ),
    "experiment weight of 0": (
        TENANT + two_variants(b"1", b"0"),
        "config: tenants.acme.experiments.x.variants[1].weight: Expected `float` >= 1e-06",
    ),
    # the smallest float: two of them split 25/75 in the hash cut
    "experiment weight of 5e-324": (
        TENANT + two_variants(b"5e-324", b"5e-324"),
        "config: tenants.acme.experiments.x.variants[0].weight: Expected `float` >= 1e-06",
    ),
    # two of them would overflow the total to inf: everyone in the last variant
    "experiment weight of 1e308": (
        TENANT + two_variants(b"1e308", b"1e308"),
        "config: tenants.acme.experiments.x.variants[0].weight: Expected `float` <= 1000000.0",
    ),
    "experiment variant with a bad window": (
        TENANT
        + b"[[tenants.acme.experiments.x.variants]]\nname = 'a'\n"
        + b"[[tenants.acme.experiments.x.variants]]\nname = 'b'\n"
        + b"send_windows = [{ start = 09:00:00, end = 09:00:00 }]",
        "tenants.acme.experiments.x.variants[1].send_windows: a window from 09:00:00 to "
        "09:00:00 is empty: start and end must differ",
    ),
    "duplicate cap names": (
        b"""
[[policy.caps]]
name = "daily"
max_count = 1
window_seconds = 86400
[[policy.caps]]
name = "daily"
max_count = 5
window_seconds = 604800
""",
        "policy.caps: cap names must be unique",
    ),
    "cap of zero": (
        b"[[policy.caps]]\nname = 'none'\nmax_count = 0\nwindow_seconds = 60",
        "config: policy.caps[0].max_count: Expected `int` >= 1",
    ),
    "bad cap name": (
        b"[[policy.caps]]\nname = 'Daily Cap'\nmax_count = 1\nwindow_seconds = 60",
        "config: policy.caps[0].name: Expected `str` matching regex '^[a-z0-9][a-z0-9_]{0,63}$'",
    ),
    "unknown provider in a tenant": (
        TENANT.replace(b'sms = ["sms_main"]', b'sms = ["sms_main", "sms_backup"]'),
        "tenants.acme.providers.sms[1]: unknown provider 'sms_backup'",
    ),
    "provider serving the wrong channel": (
        TENANT.replace(b'kind = "twilio"', b'kind = "sendgrid"'),
        "tenants.acme.providers.sms[0]: 'sms_main' is a sendgrid provider, which serves email, not sms",
    ),
    "bad provider name in a tenant": (
        TENANT.replace(b'sms = ["sms_main"]', b'sms = ["SMS main"]'),
        "config: tenants.acme.providers.sms[0]: "
        "Expected `str` matching regex '^[a-z0-9][a-z0-9_]{0,63}$'",
    ),
    "cascade channel without provider": (
        TENANT.replace(b'cascade = ["sms"]', b'cascade = ["email", "sms"]'),
        "tenants.acme.providers.email: the cascade uses email but no provider serves it",
    ),
    "empty cascade": (
        TENANT.replace(b'cascade = ["sms"]', b"cascade = []"),
        "tenants.acme.cascade: needs at least one channel",
    ),
    "channel twice in a cascade": (
        TENANT.replace(b'cascade = ["sms"]', b'cascade = ["sms", "sms"]'),
        "tenants.acme.cascade: a channel is listed twice",
    ),
    "unknown channel in a cascade": (
        TENANT.replace(b'cascade = ["sms"]', b'cascade = ["sms", "pigeon"]'),
        "config: tenants.acme.cascade[1]: Invalid enum value 'pigeon'",
    ),
    "non-simulated provider without url": (
        TENANT.replace(b'url = "https://api.twilio.example"', b""),
        "providers.sms_main.url: required unless simulated = true",
    ),
    "unknown provider kind": (
        TENANT.replace(b'kind = "twilio"', b'kind = "smpp"'),
        # the kind is the tag that picks the settings type, so msgspec says "value", not "enum"
        "config: providers.sms_main.kind: Invalid value 'smpp'",
    ),
    "tenant without brand": (
        TENANT.replace(b'brand = "Acme"', b""),
        "config: tenants.acme: Object missing required field `brand`",
    ),
    "bad tenant name": (
        b"[tenants.Acme]\nbrand = 'Acme'",
        "config: tenants.Acme: Expected `str` matching regex '^[a-z0-9][a-z0-9_]{0,63}$'",
    ),
    "a channel without a timeout": (
        b"[channels.push]\nunread_timeout_seconds = 60",
        "channels.email: missing (every channel needs a timeout)",
    ),
    "wrong type": (
        b"[ingest]\nmax_batch = '1000'",
        "config: ingest.max_batch: Expected `int`, got `str`",
    ),
    "impossible retry policy": (
        b"[dispatch.retry]\nattempts_per_provider = 0",
        "config: dispatch.retry: attempts_per_provider must be at least 1",
    ),
}


class TestImpossibleValues:
    """Values that cannot work are errors naming the dotted key."""

    @pytest.mark.parametrize(("toml", "expected"), IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
    def test_impossible(self, toml: bytes, expected: str) -> None:
        assert expected == error_of(toml)

    def test_the_largest_weights_keep_the_total_finite(self) -> None:
        experiment = load(TENANT + two_variants(b"1e6", b"1e6")).experiments("acme")["x"]
        assert 2e6 == experiment.total_weight
        names = {experiment.assign("acme", f"r{i}").name for i in range(100)}
        assert {"a", "b"} == names

    def test_the_cores_refusal_of_an_experiment_names_the_key(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Whatever the core refuses that the config's own checks let through is a
        ConfigError naming the experiment, never a bare ValueError (a traceback)."""

        def refuse(name: str, experiment: object) -> None:
            raise ValueError("variant 'a': weight must be positive and finite")

        monkeypatch.setattr("gateway.config.experiment_of", refuse)
        assert (
            "tenants.acme.experiments.x: variant 'a': weight must be positive and finite"
            == error_of(TENANT + two_variants(b"1", b"1"))
        )

    def test_the_error_names_the_right_entry_among_several(self) -> None:
        toml = b"""
[providers.a]
kind = "fcm"
simulated = true
[providers.b]
kind = "fcm"
simulated = true
rate_per_second = -1
[providers.c]
kind = "fcm"
simulated = true
"""

        assert "config: providers.b.rate_per_second: Expected `float` > 0.0" == error_of(toml)

    @pytest.mark.parametrize(
        ("message", "data", "expected"),
        [
            (
                "Expected `int`, got `str` - at `$.nowhere[...].x`",
                {},
                "nowhere[...].x: Expected `int`, got `str`",
            ),
            (
                "Expected `int`, got `str` - at `$.providers[...].burst`",
                {"providers": {"ok": {"kind": "fcm", "simulated": True}}},
                "providers[...].burst: Expected `int`, got `str`",
            ),
        ],
        ids=["path not in the data", "no entry reproduces the error"],
    )
    def test_unresolvable_paths_keep_msgspecs_words(
        self, message: str, data: dict[str, object], expected: str
    ) -> None:
        assert expected == _dotted(message, data)

    @pytest.mark.parametrize(
        "toml",
        [b"store = ", b"[store\n", b"\xff\xfe"],
        ids=["no value", "unclosed table", "not utf-8"],
    )
    def test_not_toml(self, toml: bytes) -> None:
        assert error_of(toml).startswith("config is not valid TOML: ")


def windows_and_quiet_hours(window: tuple[str, str], quiet: tuple[str, str]) -> bytes:
    """Tenant acme with promo quiet hours on every channel, a promo send window, and an
    experiment variant with the same window."""
    return (
        TENANT
        + b"[tenants.acme.policy]\n"
        + f"quiet_hours = [{{ start = {quiet[0]}, end = {quiet[1]}, categories = ['promo'] }}]\n"
        f"send_windows = [{{ categories = ['promo'], windows = "
        f"[{{ start = {window[0]}, end = {window[1]} }}] }}]\n".encode()
        + b"[[tenants.acme.experiments.x.variants]]\nname = 'a'\n"
        + b"[[tenants.acme.experiments.x.variants]]\nname = 'b'\n"
        + f"send_windows = [{{ start = {window[0]}, end = {window[1]} }}]\n".encode()
    )


class TestSendWindowsAgainstQuietHours:
    """A window is refused only when every instant of it is quiet, to the second: windows and
    quiet hours may be set in seconds, and a window shorter than a minute is not "in the quiet
    hours" unless it is."""

    @pytest.mark.parametrize(
        ("window", "quiet"),
        [
            (("20:00:30", "20:00:45"), ("21:00:00", "09:00:00")),  # under a minute, not quiet
            (("20:59:30", "21:00:00"), ("21:00:00", "09:00:00")),  # the last half minute before
            (("08:59:59", "09:00:01"), ("21:00:00", "09:00:00")),  # one second after the end
            (("20:00:00", "20:00:45"), ("20:00:30", "09:00:00")),  # quiet from the 30th second
            (("23:59:50", "00:00:10"), ("00:00:00", "00:00:05")),  # across midnight
        ],
    )
    def test_a_window_with_a_moment_outside_quiet_hours_is_accepted(
        self, window: tuple[str, str], quiet: tuple[str, str]
    ) -> None:
        config = load(windows_and_quiet_hours(window, quiet))
        assert config.experiments("acme")["x"].variants[1].windows is not None

    @pytest.mark.parametrize(
        ("window", "quiet"),
        [
            (("22:00:30", "22:00:45"), ("21:00:00", "09:00:00")),
            (("20:00:30", "20:00:45"), ("20:00:30", "20:00:45")),  # exactly the quiet hours
            (("20:59:59", "21:00:00"), ("20:59:59", "09:00:00")),  # one quiet second
            (("23:59:50", "00:00:10"), ("23:59:50", "00:00:10")),
        ],
    )
    def test_a_window_wholly_in_quiet_hours_is_refused(
        self, window: tuple[str, str], quiet: tuple[str, str]
    ) -> None:
        assert (
            "tenants.acme.policy.send_windows[0].windows: every window lies in the quiet hours "
            "of promo messages on every channel, so none could ever be sent; move the windows "
            "or the quiet hours"
        ) == error_of(windows_and_quiet_hours(window, quiet))

    def test_a_variants_window_wholly_in_quiet_hours_is_refused(self) -> None:
        toml = windows_and_quiet_hours(("22:00:30", "22:00:45"), ("21:00:00", "09:00:00"))
        toml = toml.replace(b"categories = ['promo'], windows", b"windows", 1).replace(
            b"22:00:30, end = 22:00:45 }] }]", b"10:00:00, end = 11:00:00 }] }]", 1
        )
        assert error_of(toml).startswith(
            "tenants.acme.experiments.x.variants[1].send_windows: every window lies in the "
            "quiet hours of promo messages on every channel"
        )


FOREIGN_KEYS: dict[str, tuple[bytes, dict[str, str], str]] = {
    "an fcm key on twilio": (
        TENANT.replace(b'kind = "twilio"', b'kind = "twilio"\nproject_id = "acme-app"'),
        {},
        "config: providers.sms_main.project_id: a setting of kind fcm, not of twilio",
    ),
    "a twilio key on sendgrid": (
        b"[providers.mail]\nkind = 'sendgrid'\nsimulated = true\naccount_sid = 'AC1'",
        {},
        "config: providers.mail.account_sid: a setting of kind twilio, not of sendgrid",
    ),
    "a sendgrid key on viber": (
        b"[providers.chat]\nkind = 'viber'\nsimulated = true\nwebhook_public_key = 'MFkw'",
        {},
        "config: providers.chat.webhook_public_key: a setting of kind sendgrid, not of viber",
    ),
    "a secret of two kinds, from the environment": (
        GATEWAY_TOML,
        {"CASCADEGW__PROVIDERS__SENDGRID_SIM__AUTH_TOKEN": "tok"},
        "config: providers.sendgrid_sim.auth_token: a setting of kind twilio or viber, not of"
        " sendgrid (set by CASCADEGW__PROVIDERS__SENDGRID_SIM__AUTH_TOKEN)",
    ),
}


class TestProviderSettings:
    """A provider table is read into the settings type its ``kind`` names, which has the
    common keys and only that provider's own."""

    def test_the_default_providers_have_their_kinds_settings(self) -> None:
        providers = load(GATEWAY_TOML).providers

        assert {
            "fcm_sim": (FcmSettings, "fcm", Channel.PUSH),
            "sendgrid_sim": (SendgridSettings, "sendgrid", Channel.EMAIL),
            "viber_sim": (ViberSettings, "viber", Channel.VIBER),
            "twilio_sim": (TwilioSettings, "twilio", Channel.SMS),
        } == {name: (type(p), p.kind, p.channel) for name, p in providers.items()}

    @pytest.mark.parametrize("kind", sorted(SPECS))
    def test_every_kind_reads_into_its_specs_settings(self, kind: str) -> None:
        toml = f"[providers.p]\nkind = '{kind}'\nsimulated = true\nprice = 0.5".encode()

        provider = load(toml).providers["p"]

        assert (SPECS[kind].settings, kind, 0.5) == (type(provider), provider.kind, provider.price)

    @pytest.mark.parametrize(
        ("toml", "environ", "expected"), FOREIGN_KEYS.values(), ids=FOREIGN_KEYS.keys()
    )
    def test_a_key_of_another_kind_is_refused_by_name(
        self, toml: bytes, environ: dict[str, str], expected: str
    ) -> None:
        assert expected == error_of(toml, environ)

    def test_a_provider_without_a_kind(self) -> None:
        expected = "config: providers.p: Object missing required field `kind`"
        assert expected == error_of(b"[providers.p]\nsimulated = true\nproject_id = 'x'")


class TestEnvironment:
    """CASCADEGW__SECTION__KEY overrides the file, nested, typed as TOML, any letter case."""

    def test_overrides_a_file_value(self) -> None:
        config = load(GATEWAY_TOML, CASCADEGW__STORE__SYNCHRONOUS="normal")

        assert Synchronous.NORMAL == config.store.synchronous

    def test_nested(self) -> None:
        config = load(GATEWAY_TOML, CASCADEGW__TENANTS__DEMO__BRAND="X")

        assert "X" == config.tenants["demo"].brand

    @pytest.mark.parametrize(
        ("name", "raw", "expected"),
        [
            ("CASCADEGW__DISPATCH__WORKERS", "2", 2),
            ("CASCADEGW__SIMULATOR__READ_PROBABILITY", "0.5", 0.5),
            ("CASCADEGW__POLICY__CRITICAL_SERVICE_BYPASSES_QUIET_HOURS", "false", False),
            (
                "CASCADEGW__STORE__PATH",
                "/var/lib/cascadegw/journal.db",
                "/var/lib/cascadegw/journal.db",
            ),
            ("CASCADEGW__INGEST__BIND", "tcp://127.0.0.2:5555", "tcp://127.0.0.2:5555"),
            ("CASCADEGW__CURRENCY", '"EUR"', "EUR"),
        ],
    )
    def test_values_parse_as_toml(self, name: str, raw: str, expected: object) -> None:
        config = load(GATEWAY_TOML, **{name: raw})
        *sections, key = name.removeprefix("CASCADEGW__").lower().split("__")
        node: object = config
        for section in sections:
            node = getattr(node, section)

        actual = getattr(node, key)

        assert (expected, type(expected)) == (actual, type(actual))

    def test_arrays_and_tables_parse_as_toml(self) -> None:
        config = load(
            GATEWAY_TOML,
            CASCADEGW__TENANTS__DEMO__CASCADE='["email", "sms"]',
            CASCADEGW__CHANNELS__SMS="{ unread_timeout_seconds = 60 }",
        )

        assert (Channel.EMAIL, Channel.SMS) == config.tenants["demo"].cascade
        assert 60.0 == config.step_timeouts()[Channel.SMS]

    @pytest.mark.parametrize(
        "name",
        [
            "cascadegw__store__synchronous",
            "Cascadegw__Store__Synchronous",
            "CASCADEGW__store__SYNCHRONOUS",
        ],
    )
    def test_names_are_case_insensitive(self, name: str) -> None:
        assert Synchronous.NORMAL == load(GATEWAY_TOML, **{name: "normal"}).store.synchronous

    def test_creates_sections_the_file_lacks(self) -> None:
        config = load(
            b"",
            CASCADEGW__PROVIDERS__BACKUP__KIND="twilio",
            CASCADEGW__PROVIDERS__BACKUP__SIMULATED="true",
        )

        assert ("twilio", True) == (
            config.providers["backup"].kind,
            config.providers["backup"].simulated,
        )

    def test_other_variables_are_ignored(self) -> None:
        config = load(
            GATEWAY_TOML,
            PATH="/usr/bin",
            CASCADEGW_STORE__PATH="one underscore",
            GATEWAY__STORE__PATH="another prefix",
        )

        assert load_config(GATEWAY_TOML, {}) == config

    @pytest.mark.parametrize(
        ("environ", "expected"),
        [
            (
                {"CASCADEGW__DISPATCH__WORKERS": "two"},
                "config: dispatch.workers: Expected `int`, got `str` (set by CASCADEGW__DISPATCH__WORKERS)",
            ),
            (
                {"CASCADEGW__STORE__SYNCRONOUS": "normal"},
                "config: store: Object contains unknown field `syncronous`"
                " (set by CASCADEGW__STORE__SYNCRONOUS)",
            ),
            (
                {"CASCADEGW__TENANTS__DEMO__BRAND": "1"},
                "config: tenants.demo.brand: Expected `str`, got `int`"
                " (set by CASCADEGW__TENANTS__DEMO__BRAND)",
            ),
            ({"CASCADEGW____STORE": "x"}, "CASCADEGW____STORE: empty path segment"),
            ({"CASCADEGW__STORE__PATH__DIR": "x"}, "store.path.dir: 'path' is not a table"),
        ],
    )
    def test_bad_overrides_name_the_key(self, environ: dict[str, str], expected: str) -> None:
        assert expected == error_of(GATEWAY_TOML, environ)

    def test_a_bad_value_from_the_file_names_no_variable(self) -> None:
        unrelated = {"CASCADEGW__DISPATCH__WORKERS": "2"}
        message = error_of(GATEWAY_TOML + b"\n[simulator]\nseed = 'x'\n", unrelated)
        assert "simulator.seed" in message
        assert "set by" not in message

    @pytest.mark.parametrize("variable", ["XDG_STATE_HOME", "STATE_DIRECTORY"])
    def test_a_relative_state_directory_variable_is_ignored(self, variable: str) -> None:
        """The XDG base directory specification: relative values are invalid, ignored."""
        config = load_config(GATEWAY_TOML, {variable: "relative/dir", "HOME": "/home/ann"})
        assert "/home/ann/.local/state/cascadegw" == config.store.data_dir

    @pytest.mark.parametrize(
        ("key", "value"),
        [
            ("HTTP__BIND", "127.0.0.1:99999"),
            ("HTTP__BIND", "notaport"),
            ("INGEST__BIND", "tcp://127.0.0.1:99999"),
            ("INGEST__STATUS_BIND", "tcp://127.0.0.1"),
            ("HTTP__PUBLIC_BIND", ":8081"),
        ],
    )
    def test_a_bind_needs_a_host_and_a_port_in_range(self, key: str, value: str) -> None:
        message = error_of(GATEWAY_TOML, {f"CASCADEGW__{key}": value})
        dotted = key.lower().replace("__", ".")
        assert message.startswith(f"{dotted} = {value!r}: expected host:port")
        assert f"CASCADEGW__{key}" in message

    @pytest.mark.parametrize(
        ("overrides", "key", "other"),
        [
            # the default admin bind is 127.0.0.1:8080, ingest tcp://127.0.0.1:5555
            ({"HTTP__PUBLIC_BIND": "127.0.0.1:8080"}, "http.public_bind", "http.bind"),
            ({"HTTP__PUBLIC_BIND": "localhost:8080"}, "http.public_bind", "http.bind"),
            ({"HTTP__PUBLIC_BIND": "0.0.0.0:8080"}, "http.public_bind", "http.bind"),
            ({"HTTP__PUBLIC_BIND": "127.0.0.1:5555"}, "http.public_bind", "ingest.bind"),
            ({"HTTP__BIND": "[::]:5556"}, "http.bind", "ingest.status_bind"),
            ({"INGEST__STATUS_BIND": "tcp://*:5555"}, "ingest.status_bind", "ingest.bind"),
            (
                {"HTTP__WEBHOOK_PROCESSES": "1", "HTTP__WEBHOOK_BIND": "127.0.0.1:8080"},
                "http.webhook_bind",
                "http.bind",
            ),
            (
                {"HTTP__WEBHOOK_PROCESSES": "2", "HTTP__WEBHOOK_BIND": "gw.internal:5555"},
                "http.webhook_bind",
                "ingest.bind",
            ),
        ],
    )
    def test_two_listeners_on_one_port_are_refused(
        self, overrides: dict[str, str], key: str, other: str
    ) -> None:
        message = error_of(GATEWAY_TOML, {f"CASCADEGW__{k}": v for k, v in overrides.items()})
        assert "takes the same port as" in message
        assert message.startswith(f"{key} = ")
        assert f"{other} = " in message
        assert f"CASCADEGW__{key.upper().replace('.', '__')}" in message
        assert "\n" not in message

    @pytest.mark.parametrize(
        "overrides",
        [
            {"HTTP__PUBLIC_BIND": "127.0.0.2:8080"},  # another address, the same port
            {"HTTP__PUBLIC_BIND": "[::1]:8080"},
            {"HTTP__BIND": "127.0.0.1:0", "HTTP__PUBLIC_BIND": "127.0.0.1:0"},  # any free port
            {"INGEST__BIND": "tcp://127.0.0.1:*", "INGEST__STATUS_BIND": "tcp://127.0.0.1:*"},
            {"INGEST__BIND": "ipc:///run/cascadegw/8080"},
            # webhook processes serve the public surface: public_bind is unused, and the
            # other way round
            {"HTTP__WEBHOOK_PROCESSES": "1", "HTTP__PUBLIC_BIND": "127.0.0.1:8080"},
            {"HTTP__WEBHOOK_BIND": "127.0.0.1:8080"},
        ],
    )
    def test_listeners_on_distinct_sockets_pass(self, overrides: dict[str, str]) -> None:
        load_config(GATEWAY_TOML, {f"CASCADEGW__{k}": v for k, v in overrides.items()})


FILE_SECRETS: list[tuple[bytes, str]] = [
    (
        b"[providers.mail]\nkind = 'sendgrid'\nsimulated = true\napi_key = 'SG.live'",
        "providers.mail.api_key: secrets come only from the environment; "
        "set CASCADEGW__PROVIDERS__MAIL__API_KEY",
    ),
    (
        b"[providers.sms]\nkind = 'twilio'\nsimulated = true\nauth_token = 'tok'",
        "providers.sms.auth_token: secrets come only from the environment; "
        "set CASCADEGW__PROVIDERS__SMS__AUTH_TOKEN",
    ),
    (
        b"[providers.push]\nkind = 'fcm'\nsimulated = true\nservice_account_json = '{}'",
        "providers.push.service_account_json: secrets come only from the environment; "
        "set CASCADEGW__PROVIDERS__PUSH__SERVICE_ACCOUNT_JSON",
    ),
    (
        b"[http]\nadmin_token = 'root'",
        "http.admin_token: secrets come only from the environment; "
        "set CASCADEGW__HTTP__ADMIN_TOKEN",
    ),
    (
        b"[tracking]\nsecret = 'hmac'",
        "tracking.secret: secrets come only from the environment; set CASCADEGW__TRACKING__SECRET",
    ),
    (
        b"[ingest]\ncurve_secret_key = 'k'",
        "ingest.curve_secret_key: secrets come only from the environment; "
        "set CASCADEGW__INGEST__CURVE_SECRET_KEY",
    ),
]


SECRET_PROVIDERS = ("sendgrid", "twilio", "fcm")


def secret_fields(info: mi.Type, name: str = "") -> set[str]:
    """The names of the fields typed ``Secret`` anywhere under ``info``."""
    match info:
        case mi.CustomType(cls=cls) if cls is Secret:
            return {name}
        case mi.StructType(fields=fields):
            return set().union(*(secret_fields(f.type, f.name) for f in fields))
        case mi.UnionType(types=types):
            return set().union(*(secret_fields(t, name) for t in types))
        case mi.DictType(value_type=item) | mi.VarTupleType(item_type=item):
            return secret_fields(item, name)
        case mi.Metadata(type=inner):
            return secret_fields(inner, name)
    return set()


class TestSecrets:
    """Secrets come only from the environment and never show in a repr."""

    def test_every_secret_field_is_a_secret_key(self) -> None:
        """A ``Secret`` field missing from SECRET_KEYS could be written in the file."""
        assert SECRET_KEYS == secret_fields(mi.type_info(GatewayConfig))

    @pytest.mark.parametrize(
        ("toml", "expected"),
        FILE_SECRETS,
        ids=[
            "api_key",
            "auth_token",
            "service_account_json",
            "admin_token",
            "tracking_secret",
            "curve_secret_key",
        ],
    )
    def test_a_secret_in_the_file_says_which_variable_to_set(
        self, toml: bytes, expected: str
    ) -> None:
        assert expected == error_of(toml)

    @pytest.mark.parametrize(
        "value",
        # each at least 16 bytes: the tracking secret refuses shorter ones
        [
            "SG.a1b2c3-secret-x",
            "1234567890123456",
            "true" * 4,
            '"quoted-but-long-enough"',
            "[1, 2, 3, 4, 5, 6]",
            "  spaced  out  value  ",
        ],
        ids=["plain", "digits", "bool-like", "quoted", "array-like", "spaces"],
    )
    def test_from_the_environment(self, value: str) -> None:
        # a bearer token must fit an HTTP header (no spaces): those values are refused for it
        # (test_an_admin_token_no_client_can_send), so the token gets a header-safe spelling
        token = value.replace(" ", "_")
        config = load(
            GATEWAY_TOML,
            CASCADEGW__PROVIDERS__SENDGRID_SIM__API_KEY=value,
            CASCADEGW__PROVIDERS__TWILIO_SIM__AUTH_TOKEN=value,
            CASCADEGW__PROVIDERS__FCM_SIM__SERVICE_ACCOUNT_JSON=value,
            CASCADEGW__HTTP__ADMIN_TOKEN=token,
            CASCADEGW__TRACKING__SECRET=value,
        )
        sendgrid, twilio, fcm = (config.providers[f"{kind}_sim"] for kind in SECRET_PROVIDERS)
        assert isinstance(sendgrid, SendgridSettings)
        assert isinstance(twilio, TwilioSettings)
        assert isinstance(fcm, FcmSettings)
        secrets = [
            sendgrid.api_key,
            twilio.auth_token,
            fcm.service_account_json,
            config.http.admin_token,
            config.tracking.secret,
        ]

        assert [value, value, value, token, value] == [
            s.reveal() if isinstance(s, Secret) else s for s in secrets
        ]
        for secret in secrets:
            assert value not in f"{secret!r} {secret!s} {secret}"
            assert token not in f"{secret!r} {secret!s} {secret}"

    @pytest.mark.parametrize(
        "token",
        [
            "two words and more than 16",
            "t\u043eken-with-a-cyrillic-letter",
            "abc\r\nX-Evil: 1-long",
        ],
        ids=["a space", "non-ASCII", "CR LF"],
    )
    @pytest.mark.parametrize("key", ["HTTP__ADMIN_TOKEN", "TENANTS__DEMO__ADMIN_TOKEN"])
    def test_an_admin_token_no_client_can_send(self, token: str, key: str) -> None:
        """It cannot go in an HTTP header: the admin API would be closed to everybody."""
        name = key.lower().replace("__", ".")
        with pytest.raises(ConfigError, match=f"^{name}: a token is visible ASCII"):
            load(GATEWAY_TOML, **{f"CASCADEGW__{key}": token})

    def test_config_repr_hides_secrets(self) -> None:
        environ = {
            "CASCADEGW__PROVIDERS__SENDGRID_SIM__API_KEY": "SG.a1b2c3-live-key",
            "CASCADEGW__TRACKING__SECRET": "tracking-hmac-key",
        }

        config = load_config(GATEWAY_TOML, environ)

        assert "SG.a1b2c3-live-key" not in repr(config)
        assert "tracking-hmac-key" not in repr(config)

    def test_a_secret_must_be_a_string(self) -> None:
        environ = {
            "CASCADEGW__PROVIDERS__MAIL": "{ kind = 'sendgrid', simulated = true, api_key = 42 }"
        }

        expected = (
            "config: providers.mail.api_key: Expected `str`, got `int`"
            " (set by CASCADEGW__PROVIDERS__MAIL)"
        )
        assert expected == error_of(b"", environ)

    def test_secret_never_shows_its_value(self) -> None:
        hidden = Secret("hunter2")

        assert "hunter2" not in repr(hidden) + str(hidden) + f"{hidden!r} {hidden!s}"
        assert "hunter2" == hidden.reveal()
        assert Secret("hunter2") == hidden
        assert Secret("hunter3") != hidden
        assert hash(Secret("hunter2")) == hash(hidden)
        assert "hunter2" != hidden


class TestNonFiniteNumbers:
    """TOML can spell nan and inf; no timing or rate setting may take them."""

    def test_nan_and_inf_are_refused(self) -> None:
        import pytest

        from gateway.config import load_config
        from gateway.core.errors import ConfigError

        for key, value in (
            ("CASCADEGW__DISPATCH__RETRY__BASE_DELAY_SECONDS", "nan"),
            ("CASCADEGW__DISPATCH__RETRY__MAX_RETRY_AFTER_SECONDS", "inf"),
            ("CASCADEGW__POLICY__CONTROL_GROUP__PERIOD_DAYS", "inf"),
            ("CASCADEGW__POLICY__CONTROL_GROUP__PERCENT", "nan"),
        ):
            with pytest.raises(ConfigError):
                load_config(b"", {key: value})
