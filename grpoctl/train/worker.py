"""Entry point of each process started by ``accelerate launch`` (see ``grpoctl.train.distributed``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from grpoctl.config import from_dict
from grpoctl.errors import GrpoctlError
from grpoctl.train.launchenv import ERROR_PREFIX


def main(argv: list[str]) -> int:
    cfg = from_dict(json.loads(Path(argv[0]).read_text()), origin=argv[0])
    try:
        from grpoctl.train.run import train

        train(cfg)
    except GrpoctlError as e:
        print(f"grpoctl: {e}", file=sys.stderr, flush=True)
        # accelerate's launcher exits 1 whatever its processes returned: the launch reads the error from here
        error = {"class": type(e).__name__, "message": str(e)}
        (Path(argv[0]).parent / f"{ERROR_PREFIX}{os.getpid()}.json").write_text(json.dumps(error))
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
