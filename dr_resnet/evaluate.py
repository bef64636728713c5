"""`python -m dr_resnet.evaluate`: the command; the code is in dr_resnet.training.evaluate."""

import sys

from dr_resnet.training.evaluate import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
