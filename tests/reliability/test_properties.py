"""Property-based tests: arbitrary input to the pure parsers never raises anything but our own errors.

Settings/preset import (including a nested ``2nd pass``), ``--set`` parsing, kwargs text, captions and
filename tags, pair matching and bucket maths. Any exception that is not a ``TrainTrainError`` would
reach the user as a traceback.
"""

from __future__ import annotations

import string
from fractions import Fraction
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.data.buckets import assign_bucket, crop_geometry, make_buckets
from trainer.data.captions import filename_tags, split_tags, tag_frequency
from trainer.data.plan import find_pairs
from trainer.errors import TrainTrainError
from trainer.paths import inside, safe_name
from trainer.settings import FIELDS, PASS2_KEY, Settings, parse_kwargs, parse_set_args, validate

# database=None: no .hypothesis folder in the shared checkout
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["1e-4", "512,768", "abc", "true", "None", "", "-1", "1e400", "0x10"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from([f.key for f in FIELDS] + [f.attr for f in FIELDS]),
                 st.sampled_from(["train_fixed_timesteps_in_batch", "te", "logging_dir", "unknown_key"]),
                 st.text(max_size=10))
settings_dicts = st.dictionaries(keys, values, max_size=8)


def _ours_only(fn, *args):
    try:
        return fn(*args)
    except TrainTrainError as err:
        assert str(err).strip(), "an error with an empty message"
        return None


@FAST
@given(settings_dicts, st.one_of(st.none(), settings_dicts, values))
def test_preset_import_raises_only_our_errors(d, second):
    data = dict(d)
    if second is not None:
        data[PASS2_KEY] = second
    loaded = _ours_only(Settings.from_json_dict, data)
    if loaded is not None:
        s, warnings = loaded
        assert all(isinstance(w, str) for w in warnings)
        _ours_only(validate, s)
        # a loaded preset exports and re-imports to the same settings
        again, _ = Settings.from_json_dict(s.to_json_dict())
        assert again.to_json_dict() == s.to_json_dict()


@FAST
@given(values)
def test_preset_import_of_non_objects(value):
    _ours_only(Settings.from_json_dict, value)


@FAST
@given(st.lists(st.text(max_size=40), max_size=5))
def test_set_args_raise_only_our_errors(items):
    layer = _ours_only(parse_set_args, items)
    if layer is not None:
        _ours_only(Settings.from_layers, layer)


@FAST
@given(st.text(max_size=60))
def test_kwargs_text_raises_only_our_errors(text):
    result = _ours_only(parse_kwargs, text, "train_optimizer_settings")
    if result is not None:
        assert all(name.isidentifier() for name in result)


@FAST
@given(st.text(max_size=40))
def test_filename_tags_and_captions(stem):
    tags = filename_tags(stem)
    assert "_" not in tags.split("_id_")[0] or "_id_" in stem
    parts = split_tags(tags)
    assert all(p == p.strip() and p for p in parts)
    counts = tag_frequency([tags, tags])
    assert all(v % 2 == 0 for v in counts.values())


names = st.text(alphabet=string.ascii_letters + string.digits + "_-. ", min_size=1, max_size=8)


@FAST
@given(st.lists(names, max_size=6, unique=True), st.sampled_from([".png", ".jpg", ".PNG", ".webp"]),
       st.text(max_size=6))
def test_pair_matching(stems, ext, suffix):
    files = [f"/data/{s}{ext}" for s in stems] + [f"/data/{s}{suffix}{ext}" for s in stems[:3]]
    result = _ours_only(find_pairs, files, suffix)
    if not suffix:
        assert result is None  # an empty suffix is refused, never paired with itself
        return
    pairs, warnings = result
    for orig, targ in pairs:
        assert orig != targ and targ.stem == orig.stem + suffix and orig.parent == targ.parent


@FAST
@given(st.integers(-64, 2048), st.integers(-64, 2048), st.integers(-8, 600), st.integers(-8, 2048),
       st.floats(0, 8, allow_nan=False))
def test_bucket_maths(h, w, step, min_length, ratio):
    result = _ours_only(make_buckets, (h, w), step, min_length, ratio)
    if result is None:
        return
    main, sub = result
    assert main and not set(main) & set(sub)
    area = h * w
    for bw, bh in main:
        assert 0 < bw and 0 < bh and bw * bh <= area
    for width, height in ((w, h), (max(1, w // 3), h), (w, max(1, h // 5))):
        bucket, err = assign_bucket(width, height, main)
        assert bucket in main and isinstance(err, Fraction)
        (rw, rh), (left, top) = crop_geometry(width, height, bucket)
        assert rw >= bucket[0] and rh >= bucket[1] and 0 <= left <= rw - bucket[0] and 0 <= top <= rh - bucket[1]


@FAST
@given(st.text(max_size=20))
def test_safe_names_stay_inside_their_folder(name):
    clean = _ours_only(safe_name, name, "save_lora_name")
    if clean is not None:
        root = Path("/tmp/traintrain_prop_root")
        path = inside(root, clean + ".safetensors")
        assert path.parent == root.resolve()
