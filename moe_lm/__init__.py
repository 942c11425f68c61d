"""moe-lm: small Mixture-of-Experts language models (Shazeer et al. 2017) on a laptop or one GPU."""

import os as _os

__version__ = "0.1.0"

# NOTE: torch's CPU threads are OpenMP threads. By default a thread that reaches the end of a
# parallel region spins, waiting for the others; when another program holds a core, the thread it
# waits for is descheduled and the spinning ones burn the time it needs, at every operation.
# PASSIVE makes them sleep instead. Measured on 2 cores beside other trainings (load ~13): the
# demo-sized dense model trained 8x faster with 2 threads (564 -> 4591 tokens/s), and 2 threads
# no longer lose to 1 (docs/PERFORMANCE.md). Read once, when torch's OpenMP library loads, so it
# only applies when moe_lm is imported before torch (the CLI, `python -m moe_lm`); a value the
# user set wins (OMP_WAIT_POLICY=ACTIVE restores the spinning).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
