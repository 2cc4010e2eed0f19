"""Fake ``modules.devices``: CPU, fp32."""

import torch

device = torch.device("cpu")
dtype = torch.float32
