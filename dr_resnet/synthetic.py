"""`python -m dr_resnet.synthetic`: the command; the code is in dr_resnet.data.synthetic."""

import sys

from dr_resnet.data.synthetic import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
