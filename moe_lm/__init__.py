"""moe-lm: small Mixture-of-Experts language models (Shazeer et al. 2017) on a laptop or one GPU."""

import os as _os

__version__ = "0.1.0"

# NOTE: torch's CPU threads are OpenMP threads; by default a thread that reaches the end of a
# parallel region spins, waiting for the others. Beside other busy programs that spinning burns the
# time the descheduled thread needs (OMP_WAIT_POLICY=PASSIVE trained the demo-sized dense model 8x
# faster at load ~13), but on a quiet machine PASSIVE costs a wake-up at every operation: measured
# on 2 quiet cores, `bench train` on configs/tiny-moe.yaml gave MoE 12.1K / dense 21.0K tokens/s
# with PASSIVE against 22.8K / 24.8K spinning (docs/PERFORMANCE.md). So the toolkit leaves torch's
# default; set OMP_WAIT_POLICY=PASSIVE yourself on a machine other work keeps busy.
