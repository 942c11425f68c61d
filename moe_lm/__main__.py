"""`python -m moe_lm ...` (also what torchrun launches: `torchrun -m moe_lm train ...`)."""

from .cli import run

if __name__ == "__main__":
    run()
