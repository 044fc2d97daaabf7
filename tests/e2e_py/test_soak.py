"""Memory over time (issue 20): a short churn soak in which the relay's memory must level off.

The full soak is `scripts/bench soak` (30 minutes, release build, figures in BENCHMARKS.md). This
one keeps a leak from landing unnoticed: devices reconnect every few seconds and messages flow
while relay RSS is sampled from /proc; after a warm-up its growth must stay under a slope that any
leak per message or per session at this rate would exceed. The embedded store's memory is set
small (1 MiB write buffers and cache) so that its bounded share fills during the warm-up.
"""

import threading
import time

from test_abuse import rss_bytes
from test_loadtest import loadtest

WARM_UP_S, LOAD_S = 30, 90
MAX_SLOPE_MB_PER_MIN = 6.0  # a 1 KB leak per message here is ~18 MB/min


def slope_mb_per_min(samples):
    """Least-squares slope of (seconds, bytes) samples, in MB per minute."""
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    cov = sum((t - mt) * (r - mr) for t, r in samples)
    var = sum((t - mt) ** 2 for t, _ in samples)
    return cov / var * 60 / 1e6


def test_relay_memory_levels_off_under_churn(make_relay):
    relay = make_relay({
        "RELAY_STORAGE__EMBEDDED__MEMTABLE_BYTES": str(1 << 20),
        "RELAY_STORAGE__EMBEDDED__CACHE_BYTES": str(1 << 20),
    })
    idle = rss_bytes(relay.proc.pid)
    result = {}
    load = threading.Thread(target=lambda: result.update(loadtest(
        relay, "--scenario", "churn", "--connections", "300", "--rate", "300", "--duration", str(LOAD_S),
        "--churn-every", "5", "--offline", "2", "--prefix", "soak", timeout=LOAD_S + 120)))
    started = time.monotonic()
    load.start()
    samples = []
    while load.is_alive():
        samples.append((time.monotonic() - started, rss_bytes(relay.proc.pid)))
        time.sleep(2)
    load.join()
    time.sleep(3)
    after = rss_bytes(relay.proc.pid)
    steady = [(t, r) for t, r in samples if WARM_UP_S <= t <= LOAD_S]
    slope = slope_mb_per_min(steady)
    peak = max(r for _, r in samples)
    print(f"churn soak: {result.get('accepted', 0)} accepted; RSS idle {idle / 1e6:.1f} MB, "
          f"peak {peak / 1e6:.1f} MB, after {after / 1e6:.1f} MB; slope after warm-up {slope:+.2f} MB/min")
    assert result["accepted"] > 0 and result["lost"] == 0
    assert len(steady) >= 20, len(steady)
    assert slope < MAX_SLOPE_MB_PER_MIN, slope
    # With every connection closed, what stays is bounded caches and the allocator's pools.
    assert after - idle < 64 * 1024 * 1024, (idle, after)
