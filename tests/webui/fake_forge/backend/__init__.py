"""Fake of Forge's ``backend`` package: the memory manager TrainTrain calls."""
