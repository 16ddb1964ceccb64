"""The config loader refuses unknown keys, wrong types and out-of-range values
with a message naming the key (and what it accepts); deploy/spirtd.toml
documents every key the loader knows, with its default."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from spirtd.config import DATASET_TABLES, Config, ConfigError, known_keys, load

SAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "spirtd.toml"


def load_text(tmp_path: Path, text: str, **flags: object) -> Config:
    f = tmp_path / "spirtd.toml"
    f.write_text(text)
    return load(f, dict(flags))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('listne = "127.0.0.1:1"\n', "listne"),
        ("[transport]\nidle_timout_s = 3.0\n", "transport.idle_timout_s"),
        ("[invoke]\nmemory = 512\n", "invoke.memory"),
        ("[trainin]\ncheckpoint_every = 5\n", "trainin"),
        ("[control]\ntoken = 'x'\n", "control.token"),
    ],
)
def test_unknown_keys_are_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"(^|\s){re.escape(key)}: unknown setting"):
        load_text(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("[transport]\nidle_timeout_s = 'soon'\n", "transport.idle_timeout_s", "a number"),
        ("[transport]\nmax_links = 1.5\n", "transport.max_links", "an integer"),
        ("[invoke]\nconcurrency = true\n", "invoke.concurrency", "an integer"),
        ("[invoke]\nregion = 5\n", "invoke.region", "a string"),
        ("listen = 7946\n", "listen", "a string"),
        ('bootstrap = ["10.0.0.1:7946", 7]\n', "bootstrap[1]", "a string"),
        ("task_modules = 'mypkg'\n", "task_modules", "a list of strs"),
        ("transport = 3\n", "transport", "a table"),
        ("datasets = 3\n", "datasets", "NAME"),
        ("advertise = false\n", "advertise", "a string"),
    ],
)
def test_wrong_types_name_the_key_and_the_type(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert re.search(rf"(^|\s){re.escape(key)}: ", msg), msg
    assert allowed in msg, msg


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("[transport]\nidle_timeout_s = 0\n", "transport.idle_timeout_s", "> 0"),
        (
            "[transport]\nstream_chunk_bytes = 2097152\n",
            "transport.stream_chunk_bytes",
            "<= 1048576",
        ),
        ("[transport]\nmax_links = 0\n", "transport.max_links", ">= 1"),
        (
            "[transport]\nreconnect_min_s = 5.0\nreconnect_max_s = 1.0\n",
            "transport.reconnect_max_s",
            ">= transport.reconnect_min_s",
        ),
        ("[invoke]\nconcurrency = 0\n", "invoke.concurrency", ">= 1"),
        ("[invoke]\ntimeout_s = 1000\n", "invoke.timeout_s", "<= 900"),
        ("[invoke]\nmemory_mb = 64\n", "invoke.memory_mb", ">= 128"),
        ("[invoke]\nfunction_name = ''\n", "invoke.function_name", "non-empty"),
        ("[pubsub]\ndisk_mb = -1\n", "pubsub.disk_mb", ">= 0"),
        ("[pubsub]\nretain_s = nan\n", "pubsub.retain_s", "finite"),
        ("[training]\nmin_slice_fraction = 1.5\n", "training.min_slice_fraction", "<= 1"),
        ("[training]\ncheckpoint_every = -1\n", "training.checkpoint_every", ">= 0"),
        ("[training]\nmax_state_serves = 0\n", "training.max_state_serves", ">= 1"),
        ("[training]\ndeadline_floor_s = 0\n", "training.deadline_floor_s", "> 0"),
        ('functions = "aws"\n', "functions", "'local', 'lambda'"),
        ('log_format = "xml"\n', "log_format", "'text', 'json'"),
        ('log_level = "loud"\n', "log_level", "debug"),
        ('profile = "moon"\n', "profile", "'local', 'lan', 'wan'"),
        ('listen = "nowhere"\n', "listen", "HOST:PORT"),
        ('listen = "127.0.0.1:70000"\n', "listen", "out of range"),
        ('[control]\nlisten_tcp = "no-port"\n', "control.listen_tcp", "HOST:PORT"),
        ('shard = "3/2"\n', "shard", ""),
        ('[datasets]\nmnist = "relative/dir"\n', "datasets.mnist", "absolute"),
        ('[datasets]\nmnist = "s3://My_Bucket/mnist"\n', "datasets.mnist", "bucket name"),
        ('[datasets]\nmnist = "s3://spirt-data/a/../b"\n', "datasets.mnist", "'..'"),
        ('[function_datasets]\nmnist = "data/m"\n', "function_datasets.mnist", "absolute"),
    ],
)
def test_out_of_range_values_name_the_key_and_what_is_allowed(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, text)
    msg = str(e.value)
    assert msg.startswith(f"{key}:"), msg
    assert allowed in msg, msg


def test_flags_are_checked_like_the_file_and_win_over_it(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, 'profile = "wan"\nlog_level = "debug"\n', profile="local")
    assert (cfg.profile, cfg.log_level) == ("local", "debug")
    with pytest.raises(ConfigError, match=r"^profile: must be one of"):
        load_text(tmp_path, "", profile="moon")
    with pytest.raises(ConfigError, match=r"--lisen: unknown setting"):
        load_text(tmp_path, "", lisen="x")


def test_valid_values_at_the_edges_load(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        "[transport]\nstream_chunk_bytes = 1048576\nreconnect_min_s = 1\nreconnect_max_s = 1\n"
        "[training]\nmin_slice_fraction = 1\ncheckpoint_every = 0\n"
        "[invoke]\nmemory_mb = 128\ntimeout_s = 900\n"
        '[control]\nlisten_tcp = "127.0.0.1:0"\n',
    )
    assert cfg.transport.reconnect_min_s == 1.0 and isinstance(cfg.transport.reconnect_min_s, float)
    assert cfg.training.min_slice_fraction == 1.0
    assert cfg.control.listen_tcp == "127.0.0.1:0"


# -- the sample file ----------------------------------------------------------------------

_KEY_LINE = re.compile(r"^#?\s*([a-z_]+)\s*=")
_TABLE_LINE = re.compile(r"^\[([a-z_]+)\]")


def documented_keys() -> dict[str, dict[str, str]]:
    """table -> key -> its line, for every key written in the sample, active or commented."""
    out: dict[str, dict[str, str]] = {"": {}}
    table = ""
    for line in SAMPLE.read_text().splitlines():
        t = _TABLE_LINE.match(line)
        if t:
            table = t.group(1)
            out.setdefault(table, {})
            out[""][table] = line  # a table documents the key that names it
            continue
        m = _KEY_LINE.match(line)
        if m:
            out.setdefault(table, {})[m.group(1)] = line
    return out


def test_sample_documents_every_key_the_loader_knows() -> None:
    documented = documented_keys()
    missing = []
    for table, keys in known_keys().items():
        for key in keys:
            line = documented.get(table, {}).get(key)
            if line is None:
                missing.append(f"{table}.{key}" if table else key)
            else:
                # Documented: a comment on the line says what it is for.
                assert "#" in line.lstrip("#"), f"{key}: no comment in {line!r}"
    assert not missing, f"deploy/spirtd.toml does not document: {missing}"
    # And nothing in the sample that the loader would refuse (checked by loading it).
    for table, keys in documented.items():
        known = known_keys().get(table, [])
        if table in DATASET_TABLES:
            continue
        tables = set(known_keys()) if table == "" else set()
        unknown = set(keys) - set(known) - tables
        assert not unknown, f"[{table}] documents keys the loader does not know: {unknown}"


def test_sample_active_values_are_the_defaults() -> None:
    active = tomllib.loads(SAMPLE.read_text())
    defaults = Config(data_dir=Path("/unused"))
    for key, value in active.items():
        if isinstance(value, dict) and key not in DATASET_TABLES:
            table = getattr(defaults, key)
            for k, v in value.items():
                assert getattr(table, k) == v, f"[{key}] {k} = {v!r}, default {getattr(table, k)!r}"
        elif key in DATASET_TABLES:
            assert value == {}
        else:
            assert getattr(defaults, key) == value, f"{key} = {value!r}, default differs"
    # Commented-out top-level keys are those whose default is computed or empty.
    for f in dataclasses.fields(Config):
        if f.name not in active and f.name not in DATASET_TABLES:
            assert f.default in (None, dataclasses.MISSING), f.name
