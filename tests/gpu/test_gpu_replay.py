"""On a real GPU: layers load straight to it, and replaying with the reference's settings is bit-exact."""

import pytest
import torch

from layerwise import open_run, replay
from layerwise.extract import ExtractOptions, extract
from layerwise.layer_loading import LayerOptions, open_layers
from layerwise.loading import LoadOptions
from layerwise.replay import ReplayOptions

from helpers import assert_runs_equal

pytestmark = pytest.mark.gpu
MINIMAX = "builtin:minimax-m2-tiny"


def test_layer_reads_go_straight_to_the_gpu():
    source = open_layers(MINIMAX, LayerOptions(dtype="bf16", device="cuda:0"))
    weights = source.read(1)
    assert {t.device.type for t in weights.tensors.values()} == {"cuda"}
    layer = source.build(weights)
    assert {t.device for t in layer.weights().values()} == {torch.device("cuda:0")}
    assert layer.weights()["mlp.gate.weight"].dtype == torch.float32


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_single_all_on_gpu_is_exact(tmp_path, attn):
    extract(MINIMAX, str(tmp_path / "ref"), ["The capital of France is", "a b c d e f g " * 20],
            ExtractOptions(points="residual,attn,mlp,router", batch_size=1),
            LoadOptions(device_map="cuda:0", dtype="bf16", attn_implementation=attn))
    reference = open_run(tmp_path / "ref")
    result = replay.replay(MINIMAX, reference, list(range(4)), ReplayOptions(device="cuda:0"),
                           isolated=tmp_path / "iso", chained=tmp_path / "chain")
    for path in (result.isolated, result.chained):
        run = open_run(path)
        assert_runs_equal(run, reference, names=set(run.names) & set(reference.names))
