"""dr_resnet: diabetic-retinopathy grading with hand-written ResNets.

Kept light on purpose: importing the package imports no torch, so CLIs such as
``python -m dr_resnet.preprocess`` start fast.
"""

__version__ = "0.5.0.dev0"

GRADES = ("0 none", "1 mild", "2 moderate", "3 severe", "4 proliferative")
NUM_GRADES = len(GRADES)
