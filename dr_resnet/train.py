"""`python -m dr_resnet.train`: the command; the code is in dr_resnet.training.train."""

import sys

from dr_resnet.training.train import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
