"""`services.ingest.limits.LoopLag`: how late the gateway's event loop runs what is due."""

from __future__ import annotations

import asyncio
import time

from services.ingest.limits import LoopLag


def test_a_blocked_loop_shows_as_lag_at_once_and_the_lag_clears_after():
    async def scenario() -> tuple[float, float, float]:
        lag = LoopLag(interval_s=0.01)
        lag.start()
        await asyncio.sleep(0.05)
        idle = lag.current_s()
        time.sleep(0.3)  # a handler hogging the loop: nothing else runs meanwhile
        during = lag.current_s()  # read before the late timer has fired
        await asyncio.sleep(0.1)
        after = lag.current_s()
        lag.stop()
        return idle, during, after

    idle, during, after = asyncio.run(scenario())
    assert during >= 0.28
    assert idle < during / 2 and after < during / 2
