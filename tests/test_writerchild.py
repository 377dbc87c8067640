"""The run writer's process writing one large file's tensors on several threads at once: the same
bytes as one thread writes, NaN/Inf counted, errors replied, nothing left of a file not finished."""

import threading

import pytest
import torch

from layerwise import filebits, runs, tensorfile, writerchild, writerproc
from layerwise.tensorfile import code, raw_bytes

from test_writerproc import INTENT, in_shared


class Sent:
    """A channel that keeps what the child replies."""

    def __init__(self):
        self.messages, self.arrived = [], threading.Condition()

    def send(self, message, fds=()):
        with self.arrived:
            self.messages.append(message)
            self.arrived.notify_all()


def tensors(nan_in: str | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    out = {"model.layers.3:input": torch.randn(40, 64, generator=g).to(torch.bfloat16),
           "model.layers.3:output": torch.randn(40, 64, generator=g).to(torch.bfloat16),
           "model.layers.3.mlp.gate:router_logits": torch.randn(40, 8, generator=g),
           "model.layers.3.mlp.gate:top_k_ids": torch.randint(0, 8, (40, 2), generator=g, dtype=torch.int32)}
    if nan_in is not None:
        out[nan_in].view(-1)[[7, 100]] = torch.tensor([float("nan"), float("-inf")]).to(out[nan_in].dtype)
    return out


def specs_of(ts: dict[str, torch.Tensor]) -> list[tuple]:
    return [(name, code(t.dtype), tuple(t.shape), t.nbytes, ("b", bytes(raw_bytes(t)))) for name, t in ts.items()]


def write_split(child, path, ts, seq=1) -> tuple:
    child.take(seq, str(path), str(path) + ".tmp", {"prompt": "0"}, ("blake3", filebits.HASH_CHUNK), True,
               specs_of(ts))
    with child.channel.arrived:
        assert child.channel.arrived.wait_for(lambda: child.channel.messages, timeout=30)
    return child.channel.messages.pop()


@pytest.fixture
def child(monkeypatch):
    monkeypatch.setattr(writerchild, "SPLIT_BYTES", 1)
    made = writerchild.Child(Sent(), threads=3)
    yield made
    made.jobs.shutdown(wait=True)


@pytest.mark.parametrize("nan_in", [None, "model.layers.3:output", "model.layers.3:input"])
def test_a_large_file_s_tensors_are_written_at_once_to_the_bytes_one_thread_writes(tmp_path, monkeypatch, child,
                                                                                     nan_in):
    """Two of the tensors are written at the same moment on two threads (a barrier both must
    reach; a file written whole on one thread would never pass it); the file is byte for byte
    the one `tensorfile.write_file` writes, NaN/Inf counted in its metadata (a tensor holding
    them, first or not: the file written again the plain way)."""
    meeting, threads = threading.Barrier(2, timeout=10), set()
    tensor_pass = filebits.tensor_pass

    def met(fd, at, dtype, view, check, spent):
        threads.add(threading.get_ident())
        if len(threads) <= 2 and not meeting.broken:
            meeting.wait()
        return tensor_pass(fd, at, dtype, view, check, spent)
    monkeypatch.setattr(filebits, "tensor_pass", met)
    ts = tensors(nan_in)
    reply = write_split(child, tmp_path / "f.safetensors", ts)
    assert reply[0] == "ok", reply
    assert len(threads) >= 2 and not meeting.broken
    tensorfile.write_file(tmp_path / "oracle", ts, {"prompt": "0"}, nonfinite=True)
    assert (tmp_path / "f.safetensors").read_bytes() == (tmp_path / "oracle").read_bytes()
    assert (filebits.NONFINITE_KEY + nan_in in reply[3]) if nan_in else not any(
        k.startswith(filebits.NONFINITE_KEY) for k in reply[3])
    assert not (tmp_path / "f.safetensors.tmp").exists()


def test_a_split_file_that_cannot_be_written_is_one_error_and_no_file(tmp_path, child):
    reply = write_split(child, tmp_path / "absent" / "f.safetensors", tensors())
    assert reply[0] == "err" and reply[2] is not None and "absent" in reply[4]
    assert not (tmp_path / "absent").exists()


def test_a_split_file_whose_tensors_are_not_all_written_leaves_nothing(tmp_path, child):
    """The parent gone with a file's tensors still queued: the written ones' temporary file is removed."""
    path = tmp_path / "f.safetensors"
    ts = tensors()
    split = writerchild._Split(child, 1, str(path), str(path) + ".tmp", {}, True, specs_of(ts))
    split.run(0)
    assert (tmp_path / "f.safetensors.tmp").exists() and not child.channel.messages
    split.abandon()
    assert not list(tmp_path.iterdir())


def test_the_writer_process_splits_a_large_file_to_the_same_bytes(tmp_path):
    """Through the real process, a file over SPLIT_BYTES in shared memory: the bytes this
    process's writer writes, every digest verified when read back."""
    g = torch.Generator().manual_seed(2)
    rows = writerchild.SPLIT_BYTES // (2 * 2 * 512) + 1  # two bf16 tensors over SPLIT_BYTES together
    plain = {"model.layers.0:input": torch.randn(rows, 512, generator=g).to(torch.bfloat16),
             "model.layers.0:output": torch.randn(rows, 512, generator=g).to(torch.bfloat16)}
    if not writerproc.supported():
        pytest.skip("no memfd / fd passing here")
    writer = runs.RunWriter(tmp_path / "run", INTENT, threads=3)
    writer.put(0, "model.layers.0", {name: in_shared(t) for name, t in plain.items()})
    writer.finish()
    tensorfile.write_file(tmp_path / "oracle", plain, {"prompt": "0"}, nonfinite=True)
    assert (tmp_path / "run" / runs.group_file(0, "model.layers.0")).read_bytes() == \
        (tmp_path / "oracle").read_bytes()
    run = runs.open_run(tmp_path / "run")
    assert all(torch.equal(run.tensor(name, 0), t) for name, t in plain.items())
