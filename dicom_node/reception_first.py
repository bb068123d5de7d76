"""Reception first: when a running job pauses so that instances arriving meanwhile are received
at the idle rate. Pure logic, no processes (dicom_node/engine_host.py stops and continues the
engine process on what `ReceptionPause.update` says).

On a small CPU node, a job's engine process competes with reception even at its lowest
priority: the machine's two cores share caches, memory bandwidth and the host's attention, so
any compute on one core slows a receiver on the other. `benchmarks/bench_receive.py --load
none,engine` measured it on the development machine: an engine-like load at nice 10 or under
SCHED_IDLE cost Orthanc 16 % and the node 23 % of their 1-association rate (docs/PERFORMANCE.md,
"Reception while processing"). Only work that does not run while instances arrive leaves
reception alone, so a running job pauses (SIGSTOP) while reception is active and continues
(SIGCONT) once it is quiet. A PACS that never stops sending must not starve the engine: each job
pauses for at most `jobs.reception_first_s` in all, then runs to the end whatever arrives.

Reception is active while the last instance arrived less than `RECEPTION_QUIET_S` ago: instances
of one association follow each other within milliseconds, series of one study within a fraction
of a second, so a gap longer than that means the sender has (for now) finished.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

#: Seconds without a new instance after which reception counts as quiet.
RECEPTION_QUIET_S = 0.3

#: Monotonic time (time.monotonic()) of the node's last received instance, None before the first.
LastInstanceAt = Callable[[], float | None]


class PauseAction(Enum):
    PAUSE = "pause"
    RESUME = "resume"


class ReceptionPause:
    """One job's pauses: `update` is called often (every 0.1 s) while the job runs and says
    when to stop and when to continue its engine process."""

    def __init__(self, budget_s: float, quiet_s: float = RECEPTION_QUIET_S) -> None:
        self.budget_s = budget_s
        self.quiet_s = quiet_s
        self._paused_since: float | None = None
        self._paused_s = 0.0
        self.pauses = 0

    @property
    def paused(self) -> bool:
        return self._paused_since is not None

    def paused_s(self, now: float) -> float:
        """Seconds paused so far, the current pause included."""
        current = 0.0 if self._paused_since is None else now - self._paused_since
        return self._paused_s + current

    def update(self, now: float, last_instance_at: float | None) -> PauseAction | None:
        """What to do now: PAUSE (the engine process runs and reception is active, budget
        left), RESUME (it is paused and reception is quiet, or the budget is spent), or None."""
        active = last_instance_at is not None and now - last_instance_at < self.quiet_s
        within_budget = self.paused_s(now) < self.budget_s
        if self._paused_since is None:
            if active and within_budget:
                self._paused_since = now
                self.pauses += 1
                return PauseAction.PAUSE
            return None
        if active and within_budget:
            return None
        self._paused_s += now - self._paused_since
        self._paused_since = None
        return PauseAction.RESUME
