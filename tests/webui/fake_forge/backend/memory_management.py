"""Fake ``backend.memory_management``: records which patchers were loaded onto the device."""

loaded: list = []


def load_model_gpu(patcher) -> None:
    loaded.append(patcher)
