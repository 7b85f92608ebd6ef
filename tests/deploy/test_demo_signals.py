"""The demo stops on SIGINT/SIGTERM even when a library swallows the KeyboardInterrupt."""

from __future__ import annotations

import os
import signal

import pytest

from deploy.demo import check_interrupted, stop_on_sigterm


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_swallowed_interrupt_is_raised_again(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_sigterm():
        check_interrupted()  # nothing asked yet
        try:
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # the handler runs at a bytecode boundary
                pass
        except KeyboardInterrupt:
            pass  # e.g. kafka-python's IO task took it
        with pytest.raises(KeyboardInterrupt):
            check_interrupted()
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before
