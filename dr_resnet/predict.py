"""`python -m dr_resnet.predict`: the command; the code is in dr_resnet.serving.predict."""

import sys

from dr_resnet.serving.predict import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
