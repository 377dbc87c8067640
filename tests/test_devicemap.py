"""Device maps: --device-map words, single devices and JSON files; where a module lands."""

import pytest

from layerwise import devicemap
from layerwise.errors import UserError


@pytest.mark.parametrize("content, fragment", [
    ("{nope", "not valid JSON"), ("[]", "non-empty JSON object"), ('{"": "tpu:0"}', "not a device"),
])
def test_device_map_file_errors(tmp_path, content, fragment):
    path = tmp_path / "map.json"
    path.write_text(content)
    with pytest.raises(UserError, match=fragment):
        devicemap.parse_device_map(str(path))


@pytest.mark.parametrize("word", ["fastest", "cuda", "gpu:0"])
def test_unknown_device_map_word(word):
    with pytest.raises(UserError, match="unknown --device-map"):
        devicemap.parse_device_map(word)


@pytest.mark.parametrize("text, parsed", [
    ("auto", "auto"), ("sequential", "sequential"), ("cpu", {"": "cpu"}), ("cuda:1", {"": 1}), ("2", {"": 2}),
])
def test_device_map_words_and_devices(text, parsed):
    assert devicemap.parse_device_map(text) == parsed


@pytest.mark.parametrize("value, device", [(0, 0), ("cuda:3", 3), ("3", 3), (" CPU ", "cpu"), ("disk", "disk")])
def test_normalize_device(value, device):
    assert devicemap.normalize_device(value, "test") == device


def test_device_of_takes_the_closest_mapped_ancestor():
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": "cpu"}
    assert devicemap.device_of(device_map, "model.layers.1.mlp.gate") == 1
    assert devicemap.device_of(device_map, "lm_head") == "cpu"
    assert devicemap.device_of(device_map, "model.norm") is None
    assert devicemap.device_of({"": "disk"}, "model.norm") == "disk"


@pytest.mark.parametrize("device_map, word", [({"": 0}, "cuda:0"), ({"": "cpu"}, "cpu"), ({"a": 0, "b": 1}, "custom")])
def test_describe_map(device_map, word):
    assert devicemap.describe_map(device_map) == word
    assert devicemap.device_name(0) == "cuda:0" and devicemap.device_name("disk") == "disk"
