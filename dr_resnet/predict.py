"""`python -m dr_resnet.predict`: the command; the code is in dr_resnet.serving.predict."""

import sys

from dr_resnet.serving.predict import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
