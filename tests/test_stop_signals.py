"""The stop-signal plumbing of every method file: the first Ctrl-C, SIGTERM or SIGUSR1 stops the
run (KeyboardInterrupt naming it, after the deferred block it arrives in); a second copy, such as
the one benchmarks/run.py passes on to a job that its process group also reached, or an impatient
second Ctrl-C, changes nothing, so it cannot break into the checkpoint the first one is saving."""

import importlib
import os
import signal

import pytest

FILES = ["dt", "mo_dt", "trdt", "rgdt", "tt", "iem"]


def send(sig=signal.SIGTERM) -> None:
    """The signal to this process; its Python handler runs within the next few bytecodes."""
    os.kill(os.getpid(), sig)
    for _ in range(1000):
        pass


@pytest.mark.parametrize("name", FILES)
def test_a_second_stop_signal_does_not_break_into_the_first_stop(name):
    m = importlib.import_module(name)
    old = m.catch_stop_signals()
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            send()
        send()  # while the first stop saves its checkpoint: ignored
        send(signal.SIGINT)
        # inside a deferred block (an update, a checkpoint's write) two copies make one stop, at
        # the block's end
        m.catch_stop_signals()  # a new run in this process: its first signal counts again
        with pytest.raises(KeyboardInterrupt, match="Ctrl-C"):
            with m.signals_deferred():
                send(signal.SIGINT)
                send()
                done = True
        assert done
        send()
    finally:
        m.restore_signals(old)
