"""`python -m dr_resnet.preprocess`: the command; the code is in dr_resnet.data.preprocess."""

import sys

from dr_resnet.data.preprocess import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
