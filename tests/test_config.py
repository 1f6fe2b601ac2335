"""broker.yaml validation: defaults, env overrides, and one-line errors naming file and key."""

from pathlib import Path

import pytest

from fishim.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config.prefix == "fishim"
    assert config.listener.bind == "127.0.0.1:1883"
    assert config.listener.is_loopback


def test_repo_broker_yaml_is_valid() -> None:
    config = load_config(Path(__file__).parent.parent / "broker.yaml", env={})
    assert config.store.path == Path("fishim.db")
    assert config.bridge.batch_max == 500


def test_env_overrides(tmp_path: Path) -> None:
    listeners = "listeners:\n  - {name: a, bind: '127.0.0.1:1883'}\n  - {name: w, type: ws, bind: '127.0.0.1:9001'}\n"
    path = write(tmp_path, listeners)
    config = load_config(env={"FISHIM_CONFIG": str(path), "FISHIM_DB": "/tmp/x.db", "FISHIM_BIND": "127.0.0.2:2000"})
    assert config.store.path == Path("/tmp/x.db")
    assert [lst.bind for lst in config.listeners] == ["127.0.0.2:2000", "127.0.0.1:9001"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("limits:\n  max_payload: -1\n", "limits.max_payload"),
        ("limits:\n  max_payload: lots\n", "limits.max_payload"),
        ("listeners:\n  - bind: 'nowhere'\n", "listeners.0.bind"),
        ("listeners:\n  - bind: '127.0.0.1:99999'\n", "listeners.0.bind"),
        ("listeners:\n  - type: udp\n", "listeners.0.type"),
        ("prefix: 'a b'\n", "prefix"),
        ("bridge:\n  batch_max: 0\n", "bridge.batch_max"),
        ("logging:\n  level: LOUD\n", "logging.level"),
        ("limits:\n  max_paylod: 10\n", "limits.max_paylod"),
    ],
)
def test_bad_value_is_one_line_naming_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}:")


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_config(write(tmp_path, "prefix: a\n  bad: [\n"), env={})
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml", env={})
    with pytest.raises(ConfigError, match=r"\(top level\): expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), env={})


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("limits:\n  max_paylod: 10\n", "limits.max_paylod: unknown key (did you mean 'max_payload'?)"),
        ("brokr:\n  max_inflight: 3\n", "brokr: unknown key (did you mean 'broker'?)"),
        ("listeners:\n  - bnd: '127.0.0.1:1883'\n", "listeners.0.bnd: unknown key (did you mean 'bind'?)"),
    ],
)
def test_unknown_key_says_did_you_mean(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: {line}"


def test_sizes_and_durations_take_units(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  max_payload: 64k\n  sync_page_bytes: 1M\n  max_inline_media: 512B\n"
                           "broker:\n  retry_interval: 5m\nbridge:\n  batch_wait_ms: 50ms\n")
    config = load_config(path, env={})
    assert config.limits.max_payload == 65536
    assert config.limits.sync_page_bytes == 1048576
    assert config.limits.max_inline_media == 512
    assert config.broker.retry_interval == 300
    assert config.bridge.batch_wait_ms == 50
    plain = load_config(write(tmp_path, "broker:\n  retry_interval: 20\nbridge:\n  batch_wait_ms: 2\n"), env={})
    assert (plain.broker.retry_interval, plain.bridge.batch_wait_ms) == (20, 2)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("limits:\n  max_payload: 64q\n", "limits.max_payload: not a size: '64q' (try 65536, 64k, 10M)"),
        ("broker:\n  retry_interval: soon\n",
         "broker.retry_interval: not a duration: 'soon' (try 90s, 5m, 1h30m, 250ms)"),
        ("limits:\n  max_payload: 2M\n", "limits.max_payload: Input should be less than or equal to 1048576"),
    ],
)
def test_bad_size_or_duration_is_one_line(tmp_path: Path, text: str, line: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: {line}"
