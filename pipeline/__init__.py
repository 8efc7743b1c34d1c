"""Fusioner: open-vocabulary semantic segmentation on frozen vision-language models.

Data flows through one module per concern:
images -> encoders -> store -> loader -> model -> loss/metrics -> train/eval -> sweep.
"""

__version__ = "0.1.0"
