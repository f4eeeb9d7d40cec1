"""The transfer engine's side stream: copies and P2P run beside the forward, ordered by stream waits.

On CUDA and Ascend, staging copies, the P2P batches (which ProcessGroupNCCL/HCCL order after the stream
current at the call) and the commit run on one side stream, so they overlap the forward; two waits
keep them correct: the commit starts only after the forward that read the old weights (side waits for
forward), and the next forward reads only committed weights (forward waits for side). A staging buffer
is never refilled before the copy that reads it is done, because both sit on the side stream in
order. On CPU the same calls exist (`torch.cpu` streams) and everything runs in program order, so
the one code path is the one the tests exercise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class SideStream:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.module = torch.get_device_module(device)   # torch.cuda, torch.npu (torch_npu) or torch.cpu
        self.stream = self.module.Stream()

    def bind_thread(self) -> None:
        """Make this rank's device current in the calling thread: a new thread starts on device 0,
        the current device being per host thread on CUDA and Ascend."""
        if self.device.type != "cpu":
            self.module.set_device(self.device)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the enclosed copies and P2P calls on the side stream."""
        with self.module.stream(self.stream):
            yield

    def after_forward(self) -> None:
        """Side work queued from now on waits for everything the forward stream has queued."""
        self.stream.wait_stream(self.module.current_stream())

    def before_forward(self) -> None:
        """The forward stream waits for everything queued on the side stream so far (the commit)."""
        self.module.current_stream().wait_stream(self.stream)
