"""`python -m dr_resnet.export`: the command; the code is in dr_resnet.serving.export."""

import sys

from dr_resnet.serving.export import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
