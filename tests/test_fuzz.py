"""Property-based fuzzing: any input to config or search-space loading is accepted or a ValueError."""

from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prelora_ray.config import TrainSettings, valid_keys
from prelora_ray.search_space import load_search_space, parse_search_space

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["digits", "query", "epoch", "step", "mean", "cosine", "1e-3", "vit-tiny", "", "min"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)
KEYS = st.one_of(st.sampled_from(valid_keys()), st.text(max_size=20))


def _nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        parts = str(key).split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
    return out


def _accept_or_value_error(fn, *args) -> None:
    try:
        fn(*args)
    except ValueError as exc:
        assert str(exc), "a ValueError needs a message"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_config_from_dict_never_crashes(data):
    _accept_or_value_error(TrainSettings.from_dict, _nested(data))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KEYS, st.text(max_size=15)), max_size=4))
def test_set_overrides_never_crash(pairs):
    _accept_or_value_error(TrainSettings.load, None, [f"{k}={v}" for k, v in pairs])


@settings(max_examples=200, deadline=None)
@given(st.one_of(VALUES, st.text(max_size=60)))
def test_config_file_of_any_yaml_never_crashes(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    _accept_or_value_error(TrainSettings.load, path)


PARAM = st.fixed_dictionaries(
    {"type": st.sampled_from(["uniform", "loguniform", "int", "categorical", "normal", 3])},
    optional={"low": SCALARS, "high": SCALARS, "step": SCALARS, "values": VALUES, "q": SCALARS},
)
SPACE = st.fixed_dictionaries(
    {},
    optional={
        "name": SCALARS,
        "base": st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=3).map(_nested)),
        "parameters": st.one_of(VALUES, st.dictionaries(KEYS, PARAM, max_size=4)),
        "objectives": st.one_of(
            VALUES,
            st.lists(
                st.dictionaries(
                    st.sampled_from(["metric", "mode", "x"]),
                    st.one_of(SCALARS, st.sampled_from(["final_val_acc", "max", "min", "mean_epoch_time_s"])),
                    max_size=3,
                ),
                max_size=3,
            ),
        ),
        "sampler": st.one_of(
            SCALARS,
            st.dictionaries(
                st.sampled_from(["type", "seed", "x"]),
                st.one_of(SCALARS, st.sampled_from(["tpe", "nsga2"])),
                max_size=2,
            ),
        ),
        "num_samples": SCALARS,
        "max_concurrent": SCALARS,
        "baseline": SCALARS,
        "bogus": SCALARS,
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SPACE)
def test_search_space_never_crashes(data):
    _accept_or_value_error(parse_search_space, data)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_search_space_file_of_any_text_never_crashes(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("space") / "s.yaml"
    path.write_text(text)
    _accept_or_value_error(load_search_space, path)
