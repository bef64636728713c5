"""`python -m dr_resnet.export`: the command; the code is in dr_resnet.serving.export."""

import sys

from dr_resnet.serving.export import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
