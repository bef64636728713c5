"""`python -m dr_resnet.report`: the command; the code is in dr_resnet.results.report."""

import sys

from dr_resnet.results.report import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
