"""Run several captioner commands in one torchrun launch: the distributed test starts its
processes once (`python -m torch.distributed.run ... torchrun_driver.py '[[argv], ...]'`)."""
import json
import sys

from captioner.cli import main
from captioner.distributed import setup, teardown


def run(commands: list[list[str]]) -> int:
    setup("cpu")  # joined here, so each command keeps the group for the next
    try:
        for argv in commands:
            code = main(argv)
            if code:
                return code
        return 0
    finally:
        teardown()


if __name__ == "__main__":
    sys.exit(run(json.loads(sys.argv[1])))
