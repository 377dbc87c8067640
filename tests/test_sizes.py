import pytest

from layerwise.errors import UserError
from layerwise.sizes import format_bytes, parse_gpus, parse_max_memory, parse_size


@pytest.mark.parametrize("text, expected", [
    ("40GB", 40 * 10**9), ("40gb", 40 * 10**9), ("1.5GiB", int(1.5 * 2**30)), ("512MB", 512 * 10**6),
    ("200 KiB", 200 * 1024), ("2TB", 2 * 10**12), ("7B", 7),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("40", "not a size"), ("GB", "not a size"), ("40XB", "unknown unit 'XB'"), ("0GB", "larger than zero"),
    ("-3GB", "not a size"), ("", "not a size"),
])
def test_parse_size_errors(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_size(text)


def test_max_memory_every_gpu():
    assert parse_max_memory("40GB", 3) == {0: 40 * 10**9, 1: 40 * 10**9, 2: 40 * 10**9}


def test_max_memory_per_device():
    assert parse_max_memory("0:60GB, cuda:1:40GB,cpu:200GB", 2) == {0: 60 * 10**9, 1: 40 * 10**9, "cpu": 200 * 10**9}


@pytest.mark.parametrize("text, gpus, fragment", [
    ("0:60GB,3:40GB", 2, "names GPU 3 but only 2"),
    ("2:40GB", 0, "no GPU is present"),
    ("40GB", 0, "no GPU is present"),
    ("0:60XB", 1, "unknown unit"),
    ("0:0GB", 1, "larger than zero"),
    ("gpu0:60GB", 1, "not a GPU index"),
    ("0:60GB,0:30GB", 1, "twice"),
    ("", 1, "empty"),
    ("0-60GB,1:3GB", 2, "DEVICE:SIZE"),
])
def test_max_memory_errors(text, gpus, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_max_memory(text, gpus)


def test_parse_gpus():
    assert parse_gpus("8x80GB") == [80 * 10**9] * 8
    assert parse_gpus("0:80GB,1:141GB") == [80 * 10**9, 141 * 10**9]


@pytest.mark.parametrize("text", ["0x80GB", "80GB", "1:80GB", "x80GB"])
def test_parse_gpus_errors(text):
    with pytest.raises(UserError):
        parse_gpus(text)


@pytest.mark.parametrize("num, text", [(0, "0.00 GB"), (58.32e9, "58.32 GB"), (632_864, "632.9 KB"),
                                       (1.5e6, "1.5 MB"), (12, "12 B")])
def test_format_bytes(num, text):
    assert format_bytes(num) == text
