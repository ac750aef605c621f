"""Typed config: topology files, overrides and the errors that name the setting."""

import pytest

from mer_pipeline.config import ConfigError, PipelineConfig, load_config


def test_numa0_loads_with_defaults():
    config = load_config("numa0")
    assert config.name == "numa0"
    assert config.numa_node == 0
    assert config.io.read_size_kib == 1024
    assert config.predictor.kind == "none"


def test_two_node_example_parses():
    config = load_config("two-node")
    assert config.numa_node == 1
    assert config.workers.count == 8


def test_overrides_apply_and_round_trip():
    config = load_config("numa0", {"pool.slots": 12, "io.eviction": "lru", "predictor.kind": None})
    assert config.pool.slots == 12
    assert config.io.eviction == "lru"
    assert config.predictor.kind == "none"
    assert PipelineConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "override, message",
    [
        ({"predictor.kind": "oracle"}, "predictor.kind 'oracle' is unknown"),
        ({"io.eviction": "random"}, "io.eviction 'random' is unknown"),
        ({"io.read_size_kib": 2048}, "io.read_size_kib 2048 must be a multiple of 4 between 4 and 1024"),
        ({"io.ring_depth": 0}, "io.ring_depth 0 must be between 1 and 4096"),
        ({"pool.nonsense": 1}, "unknown setting 'pool.nonsense'"),
        ({"pool.slots": "many"}, "expected int"),
    ],
)
def test_bad_values_name_the_setting(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("numa0", override)


def test_unknown_topology_lists_available():
    with pytest.raises(ConfigError, match="available: .*numa0"):
        load_config("no-such-topology")


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[io]\nring_dpeth = 8\n")
    with pytest.raises(ConfigError, match="unknown setting 'ring_dpeth'"):
        load_config(str(path))
