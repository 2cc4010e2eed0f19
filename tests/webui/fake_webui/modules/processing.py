"""Fake ``modules.processing``: the class-level cond caches."""


class StableDiffusionProcessing:
    cached_c = [None, None]
    cached_uc = [None, None]
