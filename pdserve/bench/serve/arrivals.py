"""When each request is sent, in seconds after the run starts.

With `--request-rate R` and `--burstiness B` the gaps between requests are drawn from a
gamma distribution of shape B and mean 1/R: B = 1 is a Poisson process, B < 1 burstier,
B > 1 more even. R = inf sends everything at once. A trace carries its own times.
Torch-free.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from pdserve.bench.serve.datasets import SampleRequest


def send_times(
    requests: Sequence[SampleRequest], request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Seconds after the start at which to send each request: the trace's own times where
    the requests carry them, else gaps drawn for `request_rate` per second."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness {burstiness} must be above 0 (1 is a Poisson process)")
    if request_rate <= 0:
        raise ValueError(f"--request-rate {request_rate} must be above 0 (inf sends every request at once)")
    if requests and all(r.send_at_s is not None for r in requests):
        return [float(r.send_at_s) for r in requests]  # type: ignore[arg-type]
    if math.isinf(request_rate):
        return [0.0] * len(requests)
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)
    times, now = [], 0.0
    for _ in requests:
        times.append(now)
        now += rng.gammavariate(burstiness, scale)
    return times
