"""moe-lm: small Mixture-of-Experts language models (Shazeer et al. 2017) on a laptop or one GPU."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# NOTE: torch's CPU threads are GNU OpenMP (libgomp) threads on Linux. A thread that reaches the
# end of a parallel region spins before it sleeps: 300,000 checks by default (libgomp's estimate:
# ~3 ms). Beside other busy programs the spinning threads use up their share of the CPU, the
# scheduler then runs them late, and every fork-join waits for them: with two busy loops on 2
# cores, the 64-expert layer's 128 index_adds a step took ~80 ms each instead of 0.5-2 (5 s where
# the dense FFN took 2.5), in phases of minutes. A short spin (GOMP_SPINCOUNT, 10,000 checks,
# ~0.1 ms) still covers the gap between two operations of a training step, so a quiet machine
# keeps its speed; sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a wake-up at every operation
# (the demo's MoE at half speed). Measured in docs/PERFORMANCE.md. libgomp reads the variable
# when torch loads it, so it is set only while torch is not yet imported (later it would change
# nothing here and mislead the run records), and never over a choice of the user's
# (GOMP_SPINCOUNT or OMP_WAIT_POLICY already set). A demo-sized MoE beside busy programs is
# another matter: there the short spin was faster in 2 runs of 4 and slower in 2.
SPIN_COUNT = "10000"
if not ({"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(_os.environ) or "torch" in _sys.modules):
    _os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
