"""`python -m moe_lm ...` (also what torchrun launches: `torchrun -m moe_lm train ...`)."""

import os
import sys

from .cli import run


def main() -> None:
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not launched by torchrun
        run()
        return
    # NOTE: a torchrun worker leaves the process group and ends with os._exit: gloo can abort
    # (and turn a finished run into a failure) in its destructors at interpreter exit.
    code = 0
    try:
        run()
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from .distributed import shutdown

    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
