"""Jobs left behind by a worker that died: found by the sweepers, handed back to the queue.

arq marks a started job with an in-progress key that lives for the worker's longest function
timeout plus 10 s, and refuses a new push of the same job id while the job's key exists. A worker
killed mid-job (SIGKILL, an evicted pod, a crash) leaves both behind; nothing runs the job until
the in-progress key lapses, and the sweeper's pushes are refused in silence.

So every worker keeps a heartbeat key per job it runs (``kam:held:<job id>``, refreshed every
``HEARTBEAT_S``, lapsing after ``HELD_TTL_S``). When the sweeper's push is refused it looks at the
job: still waiting in the queue is fine; in progress and named by a live heartbeat is fine; in
progress for longer than a heartbeat's reach with no heartbeat is an orphan, and its in-progress
key is deleted, so the next poll of any worker runs the job (it is still in the queue).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog
from arq.connections import ArqRedis

log = structlog.get_logger(__name__)

HELD_KEY_PREFIX = "kam:held:"
HEARTBEAT_S = 5.0
HELD_TTL_S = 15.0
# arq's key names (arq.constants, 0.28), spelled out because arq is untyped here.
IN_PROGRESS_PREFIX = "arq:in-progress:"
JOB_PREFIX = "arq:job:"


def held_key(job_id: str) -> str:
    return f"{HELD_KEY_PREFIX}{job_id}"


@dataclass
class Refusals:
    """What the refused pushes of one sweep were: counted, so the log says what happened."""

    waiting: int = 0  # queued or deferred, not started: it will run
    running: int = 0  # a live worker holds it
    reclaimed: list[str] = field(default_factory=list)  # orphans handed back to the queue
    stale: int = 0  # a job key with no queue entry: deleted, the next push goes through

    def as_log(self) -> dict[str, int]:
        return {
            "waiting": self.waiting,
            "running": self.running,
            "reclaimed": len(self.reclaimed),
            "stale": self.stale,
        }


async def reclaim_orphans(
    redis: ArqRedis, job_ids: Iterable[str], *, queue: str, in_progress_ttl_s: float
) -> Refusals:
    """Classify the jobs whose push was refused and hand back the orphans among them."""
    ids = list(job_ids)
    refusals = Refusals()
    if not ids:
        return refusals
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.pttl(f"{IN_PROGRESS_PREFIX}{job_id}")
            pipe.exists(held_key(job_id))
            pipe.zscore(queue, job_id)
        replies = await pipe.execute()
    orphans: list[str] = []
    stale: list[str] = []
    # Older than this, a job run by a live worker has had its heartbeat written at least twice.
    oldest_unheld_ms = (in_progress_ttl_s - HELD_TTL_S) * 1000
    for index, job_id in enumerate(ids):
        ttl_ms, held, score = replies[3 * index : 3 * index + 3]
        in_progress = ttl_ms is not None and ttl_ms != -2  # -2: no such key
        if not in_progress:
            if score is None:
                stale.append(job_id)
            else:
                refusals.waiting += 1
        elif held:
            refusals.running += 1
        elif ttl_ms == -1 or ttl_ms < oldest_unheld_ms:
            orphans.append(job_id)
        else:
            refusals.running += 1  # just started: its heartbeat may not be written yet
    if orphans:
        await redis.delete(*(f"{IN_PROGRESS_PREFIX}{job_id}" for job_id in orphans))
        log.warning("orphaned_jobs_reclaimed", queue=queue, count=len(orphans), first=orphans[0])
        refusals.reclaimed = orphans
    if stale:
        await redis.delete(*(f"{JOB_PREFIX}{job_id}" for job_id in stale))
        refusals.stale = len(stale)
    return refusals
