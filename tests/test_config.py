"""Node configuration: TOML file, flag overrides, and a clear ConfigError for every bad value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from idlefleet.node.config import NodeConfig, load_config
from idlefleet.protocols.errors import ConfigError

BOOT = "/ip4/127.0.0.1/tcp/4000/p2p/12D3KooWBRFW3HkJCLKSWb4yG6iWRBpgNjbM4FFvNsL5T5JKTqrd"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), **overrides)
    return str(exc.value)


def test_no_file_and_no_overrides_gives_the_defaults() -> None:
    assert load_config() == NodeConfig()


def test_load_full_example(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
key_file = "~/.idlefleet/node.key"
listen_host = "0.0.0.0"
port = 4001
bootstrap = ["{BOOT}"]
region = "u33d"
vehicle = "sim:commuter:seed=3"
consent = true
consent_hours = 8
link_kind = "cellular"
link_metered = true
publish_policy = "naive"
refresh_s = 10.0
record_ttl_s = 30
event_log = "events.jsonl"
""")
    config = load_config(path)

    assert config.key_file == Path("~/.idlefleet/node.key")
    assert config.key_path == Path.home() / ".idlefleet" / "node.key"
    assert config.listen_host == "0.0.0.0"
    assert config.port == 4001
    assert config.bootstrap == (BOOT,)
    assert config.region == "u33d"
    assert config.vehicle == "sim:commuter:seed=3"
    assert config.consent is True
    assert config.consent_hours == 8
    assert config.link_kind == "cellular"
    assert config.link_metered is True
    assert config.publish_policy == "naive"
    assert config.refresh_s == 10.0
    assert config.record_ttl_s == 30
    assert config.event_log == Path("events.jsonl")


def test_unset_keys_keep_their_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'region = "gcpv"\n'))
    assert config.region == "gcpv"
    assert config.replace(region="u33d") == NodeConfig()


def test_a_single_bootstrap_string_becomes_a_tuple(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, f'bootstrap = "{BOOT}"\n')).bootstrap == (BOOT,)
    assert load_config(bootstrap=BOOT).bootstrap == (BOOT,)
    assert load_config(bootstrap=[BOOT, BOOT]).bootstrap == (BOOT, BOOT)


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 4001\nregion = "u33d"\nlink_kind = "wifi"\n')
    config = load_config(path, port=5000, link_kind="ethernet", key_file="/tmp/k.key")
    assert config.port == 5000
    assert config.link_kind == "ethernet"
    assert config.region == "u33d"
    assert config.key_file == Path("/tmp/k.key")


def test_none_overrides_are_ignored(tmp_path: Path) -> None:
    # Flags the user did not give arrive as None and must not erase the file's values.
    path = write(tmp_path, "port = 4001\n")
    config = load_config(path, port=None, region=None, bootstrap=None)
    assert config.port == 4001
    assert config.region == NodeConfig().region
    assert config.bootstrap == ()


def test_overrides_without_a_file() -> None:
    assert load_config(None, port=7000).port == 7000


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'prot = 4001\nregoin = "u33d"\n')
    assert "unknown config keys" in message
    assert "prot" in message
    assert "regoin" in message


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown config keys: colour"):
        load_config(None, colour="red")


def test_a_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    assert "node" in config_error(tmp_path, "[node]\nport = 4001\n")


@pytest.mark.parametrize("region", ["", "U33D", "u33a", "u33i", "u33l", "u33o", "u33d-", "0123456789bcd"])
def test_bad_region(tmp_path: Path, region: str) -> None:
    message = config_error(tmp_path, f'region = "{region}"\n')
    assert "region" in message
    assert "geohash" in message


@pytest.mark.parametrize("region", ["u", "u33d", "0123456789bc", "zzzz"])
def test_good_region(tmp_path: Path, region: str) -> None:
    assert load_config(write(tmp_path, f'region = "{region}"\n')).region == region


def test_bad_link_kind(tmp_path: Path) -> None:
    message = config_error(tmp_path, 'link_kind = "carrier-pigeon"\n')
    assert "link_kind" in message
    assert "ethernet, wifi, cellular" in message
    assert "carrier-pigeon" in message


@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_bad_port(tmp_path: Path, port: int) -> None:
    assert "port must be 0..65535" in config_error(tmp_path, f"port = {port}\n")


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_good_port(tmp_path: Path, port: int) -> None:
    assert load_config(write(tmp_path, f"port = {port}\n")).port == port


def test_bootstrap_without_peer_id(tmp_path: Path) -> None:
    addr = "/ip4/127.0.0.1/tcp/4000"
    message = config_error(tmp_path, f'bootstrap = ["{BOOT}", "{addr}"]\n')
    assert addr in message
    assert "/p2p/" in message


def test_bad_publish_policy(tmp_path: Path) -> None:
    assert "publish_policy" in config_error(tmp_path, 'publish_policy = "flood"\n')


@pytest.mark.parametrize("hours", [0, -1])
def test_bad_consent_hours(tmp_path: Path, hours: int) -> None:
    assert "consent_hours" in config_error(tmp_path, f"consent_hours = {hours}\n")


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("refresh_s = 0\n", "refresh_s"),
        ("refresh_s = 31\nrecord_ttl_s = 60\n", "refresh_s"),
        ("record_ttl_s = 601\nrefresh_s = 10\n", "record_ttl_s"),
    ],
)
def test_bad_timing(tmp_path: Path, text: str, field: str) -> None:
    assert field in config_error(tmp_path, text)


@pytest.mark.parametrize(
    "text",
    [
        "port = 4001\nport = 4002\n",  # duplicate key
        'region = "u33d\n',  # unterminated string
        "port = \n",
        "this is not toml\n",
        "[unclosed\n",
    ],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    message = config_error(tmp_path, text)
    assert "is not valid TOML" in message
    assert "node.toml" in message
    assert "line" in message  # tomllib says where


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    "text",
    [
        'port = "4001"\n',
        "region = 5\n",
        "key_file = 5\n",
        "event_log = [1]\n",
        "bootstrap = 5\n",
        "bootstrap = [5]\n",
        "refresh_s = \"soon\"\n",
    ],
)
def test_wrong_types_give_a_config_error(tmp_path: Path, text: str) -> None:
    # Never a raw TypeError traceback for a typo in the user's file.
    config_error(tmp_path, text)


def test_config_is_frozen() -> None:
    config = NodeConfig()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]
    assert config.replace(port=1).port == 1
    with pytest.raises(ConfigError):
        config.replace(port=-1)


def test_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b'region = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match=r"node\.toml"):
        load_config(path)


# -- every value type-checked, the key named (issue 8, finding 5) ---------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('consent = "false"\n', "consent"),  # a string is not a boolean: it must not serve
        ('serve = "yes"\n', "serve"),
        ("link_metered = 1\n", "link_metered"),
        ("max_sessions = 0\n", "max_sessions"),
        ("max_sessions = 2.5\n", "max_sessions"),
        ("max_sessions = true\n", "max_sessions"),
        ('kv_budget_mb = "lots"\n', "kv_budget_mb"),
        ("kv_budget_mb = 0\n", "kv_budget_mb"),
        ("kv_budget_mb = nan\n", "kv_budget_mb"),
        ("memory_budget_mb = -5\n", "memory_budget_mb"),
        ("memory_budget_mb = inf\n", "memory_budget_mb"),
        ("session_idle_s = 0\n", "session_idle_s"),
        ("rebalance_s = false\n", "rebalance_s"),
        ("consent_hours = nan\n", "consent_hours"),
        ("heartbeat_s = true\n", "heartbeat_s"),
        ("target_peers = 8.0\n", "target_peers"),
        ("model = 5\n", "model"),
        ('model = ""\n', "model"),
        ('vehicle = ""\n', "vehicle"),
        ("vehicle = 5\n", "vehicle"),
        ("listen_host = []\n", "listen_host"),
        ('key_file = ""\n', "key_file"),
        ("extra = 5\n", "extra"),
    ],
)
def test_every_bad_value_names_its_key(tmp_path: Path, text: str, key: str) -> None:
    assert key in config_error(tmp_path, text)


def test_config_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path)


def test_paths_given_as_strings_in_code_are_paths() -> None:
    config = NodeConfig(key_file="app.key", event_log="e.jsonl", bootstrap=[BOOT])  # type: ignore[arg-type]
    assert (config.key_file, config.event_log) == (Path("app.key"), Path("e.jsonl"))
    assert config.bootstrap == (BOOT,)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from idlefleet.node.cli.main import main

    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('consent = "false"\n', "consent must be a boolean"),
        ("max_sessions = 0\n", "max_sessions"),
        ('kv_budget_mb = "lots"\n', "kv_budget_mb must be a number"),
        ('vehicle = "sysfs:/nonexistent"\n', "/nonexistent"),
        ("key_file = \"{tmp}\"\n", "is not a regular file"),
    ],
)
def test_node_cli_bad_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     text: str, needle: str) -> None:
    # Fails at start-up, before any network: no traceback, one line naming the problem.
    key = f'key_file = "{tmp_path / "node.key"}"\n' if "key_file" not in text else ""
    path = write(tmp_path, key + text.replace("{tmp}", str(tmp_path)))
    code, err = run_cli(["node", "--config", str(path), "--log-level", "ERROR"], capsys)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "node.key").exists()  # no identity is created for a node that cannot run
