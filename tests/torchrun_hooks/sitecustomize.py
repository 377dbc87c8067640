"""Faults for the torchrun tests (tests/test_distributed.py), loaded by every process of a job
through PYTHONPATH; nothing here runs unless a test sets these variables:

- LAYERWISE_TEST_FAULT=die|hang|fail with LAYERWISE_TEST_RANK=R: rank R, once its batches are
  computed, kills itself (SIGKILL: no chance to report), hangs (to be ended by the timeout) or
  fails with a UserError of its own (a full disk, say). With LAYERWISE_TEST_FAULT_AT=chain it
  does so in a layer test, when it marks its first chained outputs as sent.
- LAYERWISE_TEST_GPUS=N: torch.cuda.device_count() says N (a node whose GPUs the ranks do not divide).
- LAYERWISE_TEST_LATE_POST=R:S: rank R posts that a layer's chained outputs are on their way S
  seconds after sending them (the next rank meanwhile runs its isolated batches).
- LAYERWISE_TEST_THREADS_AT_EXIT=DIR: each rank writes the names of its native threads, as its
  atexit functions run, to DIR/rank<R>.txt (a process group left alive shows as gloo threads).
"""

import os

if os.environ.get("LAYERWISE_TEST_FAULT") and os.environ.get("RANK") == os.environ.get("LAYERWISE_TEST_RANK"):
    from layerwise import recording

    def _fault(self):
        if os.environ["LAYERWISE_TEST_FAULT"] == "die":
            os.kill(os.getpid(), 9)
        if os.environ["LAYERWISE_TEST_FAULT"] == "fail":
            from layerwise.errors import UserError

            raise UserError("cannot write tensors/p00001: No space left on device (test)")
        import time

        time.sleep(3600)

    if os.environ.get("LAYERWISE_TEST_FAULT_AT") == "chain":  # a layer test, as it hands its first layer on
        from layerwise import chain

        chain.Link.post = lambda self, layer: _fault(self)
    else:
        recording.Recording.close_capture = _fault

if os.environ.get("LAYERWISE_TEST_GPUS"):
    import torch

    torch.cuda.device_count = lambda: int(os.environ["LAYERWISE_TEST_GPUS"])

if os.environ.get("LAYERWISE_TEST_LATE_POST", ":").split(":")[0] == os.environ.get("RANK"):
    import time

    from layerwise import chain

    _post = chain.Link.post

    def _late_post(self, layer):
        time.sleep(float(os.environ["LAYERWISE_TEST_LATE_POST"].split(":")[1]))
        _post(self, layer)

    chain.Link.post = _late_post

if os.environ.get("LAYERWISE_TEST_THREADS_AT_EXIT") and os.environ.get("RANK"):
    import atexit

    def _threads_at_exit():
        tasks = f"/proc/{os.getpid()}/task"
        names = sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))
        with open(os.path.join(os.environ["LAYERWISE_TEST_THREADS_AT_EXIT"], f"rank{os.environ['RANK']}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")

    atexit.register(_threads_at_exit)
