"""How many Numba threads each engine call uses.

A fixed count is honoured as given (``Engine.load(..., threads=n)``, ``--threads n``). By default
(``threads=None``) the engine chooses per kind of call (streaming step or whole sequence, and the
batch size) between one thread and all of Numba's threads from what it measures: the faster of
the two, by an exponential moving average of the call time of the count in use against probes of
the other count: it switches when two probes in a row beat the average by ``MARGIN`` (one fast
call on a busy machine is luck: a 2-thread step there is sometimes faster than a 1-thread one and
on average twice as slow). A probe that loses doubles the interval to the next one (up to ``MAX_INTERVAL`` calls),
so on a busy machine — where a parallel region waits for a descheduled thread and a two-thread
step can take 30× a one-thread step — the cost of probing stays a small fraction of the calls,
and when the machine becomes idle again the next probe finds the parallel count faster and
switches back. ``benchmarks/threads.py`` measures the policy against fixed counts.
"""
from __future__ import annotations

import time

ALPHA = 0.25               # weight of a new measurement in the moving average
FIRST_INTERVAL = 16        # calls between probes of the other thread count, at first
MAX_INTERVAL = 4096
MARGIN = 0.10              # a probe must beat the count in use by this fraction, twice in a row


class _Arm:
    __slots__ = ("avg", "n")

    def __init__(self):
        self.avg, self.n = float("inf"), 0

    def add(self, dt: float) -> None:
        self.avg = dt if self.n == 0 else (1 - ALPHA) * self.avg + ALPHA * dt
        self.n += 1


class _Choice:
    """The state of one kind of call: the two candidate counts, their averages, the probe clock."""

    __slots__ = ("arms", "current", "interval", "countdown", "probing", "won_once")

    def __init__(self, counts):
        self.arms = {c: _Arm() for c in counts}
        self.current = counts[-1]                 # start parallel; the first probes correct it
        self.interval = FIRST_INTERVAL
        self.countdown = 2                        # measure the other count early
        self.probing = None
        self.won_once = False                     # the last probe won: confirm with the next call


class ThreadPolicy:
    """Chooses and records the thread count of each call (see the module docstring)."""

    def __init__(self, max_threads: int):
        self.max_threads = max(1, int(max_threads))
        self.counts = (1, self.max_threads) if self.max_threads > 1 else (1,)
        self._choices: dict = {}

    def choose(self, key) -> int:
        if len(self.counts) == 1:
            return 1
        ch = self._choices.get(key)
        if ch is None:
            ch = self._choices[key] = _Choice(self.counts)
        ch.countdown -= 1
        if ch.countdown <= 0:
            other = self.counts[0] if ch.current == self.counts[1] else self.counts[1]
            ch.probing = other
            return other
        return ch.current

    def record(self, key, threads: int, seconds: float) -> None:
        ch = self._choices.get(key)
        if ch is None:
            return
        if ch.probing is None:
            ch.arms[threads].add(seconds)
            return
        ch.probing = None
        ch.arms[threads].avg = seconds            # a probe stands for now, whatever that arm did before
        if seconds < (1 - MARGIN) * ch.arms[ch.current].avg:
            if not ch.won_once:                   # one fast call on a busy machine is luck: probe again
                ch.won_once, ch.countdown = True, 1
                return
            ch.current, ch.interval = threads, FIRST_INTERVAL     # switched: keep checking closely
        else:
            ch.interval = min(ch.interval * 2, MAX_INTERVAL)      # the probe lost: probe less often
        ch.won_once = False
        ch.countdown = ch.interval

    def summary(self) -> dict:
        return {str(k): {"threads": ch.current, **{f"avg_ms_t{c}": a.avg * 1e3 for c, a in ch.arms.items()}}
                for k, ch in self._choices.items()}


def timed(policy: ThreadPolicy, key, fn):
    """Run ``fn()`` with the thread count the policy picks for ``key``; record its time."""
    import numba

    n = policy.choose(key)
    numba.set_num_threads(n)
    t0 = time.perf_counter()
    out = fn()
    policy.record(key, n, time.perf_counter() - t0)
    return out
