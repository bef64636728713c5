"""`python -m dr_resnet.pretrain`: the command; the code is in dr_resnet.pretraining.run."""

import sys

from dr_resnet.pretraining.run import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
