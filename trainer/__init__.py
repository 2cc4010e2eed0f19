"""TrainTrain: LoRA, iLECO, Difference and ADDifT training for Stable Diffusion."""

__version__ = "0.1.0"
