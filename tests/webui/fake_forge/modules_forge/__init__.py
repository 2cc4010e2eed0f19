"""Forge's ``modules_forge`` package: its presence is how TrainTrain tells Forge from A1111."""
