"""Unit tests of deployment option validation (taskserve/spec.py)."""

from __future__ import annotations

import json
import re

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskserve.spec import (
    AUTOSCALING_KEYS,
    OPTION_NAMES,
    AutoscalingConfig,
    DeploymentOptions,
    check_autoscaling_config,
    check_goal_options,
    check_json_value,
    check_name,
    replica_spec_hash,
    stable_hash,
    validate_options,
)

from .helpers import examples

# --------------------------------------------------------------------------- good options


def test_defaults_match_the_spec():
    options = validate_options({})
    assert options.num_replicas == 1
    assert options.version is None
    assert options.user_config is None
    assert options.num_cpus == 1 and options.num_gpus == 0 and options.memory is None
    assert options.max_concurrent_queries == 1
    assert options.max_unavailable == 0.2 and options.max_surge == 0
    assert options.graceful_shutdown_timeout_s == 20 and options.health_check_period_s == 10
    assert options.serializer == "json"


def test_good_options_are_kept():
    options = validate_options(
        {
            "name": "resnet-50.v2",
            "num_replicas": 0,
            "version": "v1",
            "user_config": {"threshold": 0.5, "labels": ["a", "b"], "nested": {"x": None, "y": True}},
            "num_cpus": 0.5,
            "num_gpus": 0.25,
            "memory": 2**30,
            "runtime_env": {"pip": ["numpy==1.26"], "env_vars": {"OMP_NUM_THREADS": "4"}, "working_dir": "."},
            "route_prefix": "/resnet",
            "max_concurrent_queries": 1000,
            "max_unavailable": 1,
            "max_surge": 0.25,
            "graceful_shutdown_timeout_s": 0,
            "health_check_period_s": 0.5,
            "serializer": "pickle",
        }
    )
    assert options.name == "resnet-50.v2"
    assert options.num_gpus == 0.25
    assert options.max_unavailable == 1 and isinstance(options.max_unavailable, int)
    assert options.runtime_env["env_vars"] == {"OMP_NUM_THREADS": "4"}
    assert options.user_config["nested"] == {"x": None, "y": True}


def test_options_update_a_base_and_leave_it_unchanged():
    base = validate_options({"num_replicas": 3, "version": "v1"})
    changed = validate_options({"num_replicas": 5}, base)
    assert (changed.num_replicas, changed.version) == (5, "v1")
    assert base.num_replicas == 3
    with pytest.raises(pydantic.ValidationError):
        base.num_replicas = 4   # frozen


def test_tuples_are_accepted_in_user_config():
    assert validate_options({"user_config": {"shape": (1, 2)}}).user_config == {"shape": (1, 2)}


# --------------------------------------------------------------------------- bad options


BAD_OPTIONS = [
    # (option, value, exception type, a fragment of the message)
    ("num_replicas", -1, ValueError, "greater than or equal to 0"),
    ("num_replicas", 10_001, ValueError, "less than or equal to 10000"),
    ("num_replicas", "3", TypeError, "valid integer"),
    ("num_replicas", 2.0, TypeError, "valid integer"),
    ("num_replicas", True, TypeError, "valid integer"),
    ("num_replicas", None, TypeError, "valid integer"),
    ("num_cpus", -0.5, ValueError, "greater than or equal to 0"),
    ("num_cpus", "1", TypeError, ""),
    ("num_cpus", float("nan"), ValueError, ""),
    ("num_gpus", -1, ValueError, "greater than or equal to 0"),
    ("memory", -1, ValueError, "greater than or equal to 0"),
    ("memory", 1.5, TypeError, "valid integer"),
    ("version", "", ValueError, "a version is 1 to 128 characters"),
    ("version", "x" * 129, ValueError, "a version is 1 to 128 characters"),
    ("version", 3, TypeError, "valid string"),
    ("route_prefix", "api", ValueError, "a route_prefix starts with '/'"),
    ("route_prefix", 5, TypeError, "valid string"),
    ("max_concurrent_queries", 0, ValueError, "greater than or equal to 1"),
    ("max_concurrent_queries", 1001, ValueError, "less than or equal to 1000"),
    ("max_unavailable", -0.1, ValueError, "greater than or equal to 0"),
    ("max_unavailable", True, TypeError, ""),
    ("max_unavailable", "20%", TypeError, ""),
    ("max_surge", -1, ValueError, "greater than or equal to 0"),
    ("graceful_shutdown_timeout_s", -1, ValueError, "greater than or equal to 0"),
    ("health_check_period_s", -1, ValueError, "greater than 0"),
    ("health_check_period_s", 0.0, ValueError, "greater than 0"),
    ("serializer", "yaml", TypeError, "'json' or 'pickle'"),
    ("runtime_env", "x", TypeError, "valid dictionary"),
    ("runtime_env", {"conda": "env.yaml"}, ValueError,
     "unknown runtime_env key 'conda'; the keys are 'pip', 'env_vars' and 'working_dir'"),
    ("runtime_env", {"env_vars": {"A": 1}}, ValueError, "runtime_env['env_vars'] maps strings to strings"),
    ("runtime_env", {"env_vars": ["A=1"]}, ValueError, "runtime_env['env_vars'] maps strings to strings"),
]


@pytest.mark.parametrize("option, value, error, fragment", BAD_OPTIONS,
                         ids=[f"{o}={v!r}"[:40] for o, v, _, _ in BAD_OPTIONS])
def test_bad_option_gives_one_clear_error_naming_it(option, value, error, fragment):
    with pytest.raises(error) as info:
        validate_options({option: value})
    assert type(info.value) is error
    message = str(info.value)
    assert message.startswith(f"invalid {option}={value!r}: "), message
    assert fragment in message
    assert "\n" not in message                          # one sentence, no pydantic dump
    assert "pydantic" not in message and "For further information" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__   # `from None`


@pytest.mark.parametrize(
    "option, value, hint",
    [
        ("num_replicas", -1, "use a whole number from 0 to 10000"),
        ("max_unavailable", -1, "use a fraction like 0.2 or a count like 1"),
        ("max_surge", -0.5, "use a fraction like 0.25 or a count like 1; 0 disables surge"),
        ("serializer", "xml", "use 'json' or 'pickle'"),
        ("memory", "1GB", "use a whole number of bytes >= 0, or None"),
    ],
)
def test_bad_option_message_says_how_to_fix_it(option, value, hint):
    with pytest.raises((TypeError, ValueError)) as info:
        validate_options({option: value})
    assert str(info.value).endswith(hint)


def test_bad_option_over_a_base_names_the_new_value():
    base = validate_options({"num_replicas": 3})
    with pytest.raises(ValueError, match=r"^invalid num_cpus=-2: "):
        validate_options({"num_cpus": -2}, base)


@pytest.mark.parametrize(
    "typo, suggestion",
    [
        ("num_replica", "num_replicas"),
        ("numreplicas", "num_replicas"),
        ("user_conf", "user_config"),
        ("maxsurge", "max_surge"),
        ("num_gpu", "num_gpus"),
        ("max_unavaliable", "max_unavailable"),
        ("route_prefx", "route_prefix"),
    ],
)
def test_unknown_option_suggests_the_close_name(typo, suggestion):
    with pytest.raises(TypeError) as info:
        validate_options({typo: 1})
    assert str(info.value) == f"unknown deployment option {typo!r}; did you mean {suggestion!r}?"


def test_unknown_option_without_close_name_lists_the_options():
    with pytest.raises(TypeError) as info:
        validate_options({"xyzzy": 1})
    message = str(info.value)
    assert message.startswith("unknown deployment option 'xyzzy'; the options are ")
    for name in OPTION_NAMES:
        assert name in message


def test_unknown_option_is_reported_before_bad_values():
    with pytest.raises(TypeError, match="unknown deployment option 'replicas'"):
        validate_options({"num_cpus": -1, "replicas": 2})


def test_bad_user_config_names_the_key_path():
    with pytest.raises(TypeError) as info:
        validate_options({"user_config": {"weights": [1, 2, {3}]}})
    assert str(info.value).startswith("user_config['weights'][2] is a set, which JSON cannot hold")


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["a", "A", "0", "model", "resnet-50.v2", "my_model", "a.b-c_d", "x" * 64, "-", ".", "_", "UPPER_lower-09"],
)
def test_good_names(name):
    assert check_name(name) == name
    assert validate_options({"name": name}).name == name


@pytest.mark.parametrize(
    "name",
    ["", "x" * 65, "a b", "a/b", "a:b", "ünïcode", "a*", "tab\tname", "\nname", "name!", "@x", None, 5, b"bytes"],
)
def test_bad_names(name):
    with pytest.raises(ValueError) as info:
        check_name(name)
    assert str(info.value) == (
        f"invalid deployment name {name!r}: use 1 to 64 letters, digits, '-', '_' or '.'"
    )


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "a/b"])
def test_bad_name_through_options(name):
    with pytest.raises(ValueError) as info:
        validate_options({"name": name})
    assert str(info.value) == f"invalid deployment name {name!r}: use 1 to 64 letters, digits, '-', '_' or '.'"


def test_name_of_wrong_type_through_options_is_a_type_error():
    with pytest.raises(TypeError, match=r"^invalid name=5: "):
        validate_options({"name": 5})


@given(st.text(alphabet="abcXYZ019-_.", min_size=1, max_size=64))
@settings(max_examples=examples(60), deadline=None)
def test_property_names_of_allowed_characters_pass(name):
    assert check_name(name) == name


def _has_other_character(name: str) -> bool:
    return any(not (c.isascii() and (c.isalnum() or c in "-_.")) for c in name)


# A name ending in "\n" is left out here: check_name accepts "abc\n" (its pattern ends in
# "$", which also matches before a final newline); that is reported, not tested.
@given(st.text(min_size=1, max_size=70).filter(lambda s: _has_other_character(s) and not s.endswith("\n")))
@settings(max_examples=examples(60), deadline=None)
def test_property_names_with_other_characters_fail(name):
    with pytest.raises(ValueError):
        check_name(name)


# --------------------------------------------------------------------------- check_json_value


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -3, 1.5, "text", [], {}, [1, "a", None], {"a": {"b": [1, 2, {"c": 3.0}]}}, (1, 2), ({"x": (1,)},)],
)
def test_json_values_pass(value):
    assert check_json_value(value, "user_config") is None


@pytest.mark.parametrize(
    "value, message",
    [
        ({"weights": [1, 2, {3}]},
         "user_config['weights'][2] is a set, which JSON cannot hold; "
         "use lists, dicts, strings, numbers, booleans or None"),
        ({3},
         "user_config is a set, which JSON cannot hold; use lists, dicts, strings, numbers, booleans or None"),
        ([0, [1, b"raw"]],
         "user_config[1][1] is a bytes, which JSON cannot hold; use lists, dicts, strings, numbers, booleans or None"),
        ({"a": {"b": object()}},
         "user_config['a']['b'] is a object, which JSON cannot hold; use lists, dicts, strings, numbers, booleans or None"),
        ({"a": [{1: "x"}]},
         "user_config['a'][0] has the key 1, which JSON cannot hold; use string keys"),
        ({"lr": float("nan")}, "user_config['lr'] is nan, which JSON cannot hold; use a finite number"),
        ([float("inf")], "user_config[0] is inf, which JSON cannot hold; use a finite number"),
        ({"x": [float("-inf")]}, "user_config['x'][0] is -inf, which JSON cannot hold; use a finite number"),
        ({"ok": 1, "bad": {1, 2}, "also_bad": set()},   # the first bad one is named
         "user_config['bad'] is a set, which JSON cannot hold; use lists, dicts, strings, numbers, booleans or None"),
        ({"it's": {0.5}},
         "user_config[\"it's\"] is a set, which JSON cannot hold; use lists, dicts, strings, numbers, booleans or None"),
    ],
)
def test_json_value_errors_name_the_key_path(value, message):
    with pytest.raises(TypeError) as info:
        check_json_value(value, "user_config")
    assert str(info.value) == message


def test_json_value_path_prefix_is_used():
    with pytest.raises(TypeError, match=r"^args\[0\]\['k'\] is a complex"):
        check_json_value([{"k": 1j}], "args")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@given(JSON)
@settings(max_examples=examples(80), deadline=None)
def test_property_json_values_pass(value):
    check_json_value(value, "user_config")
    assert validate_options({"user_config": value}).user_config == value


@given(JSON, st.sampled_from([{1}, b"x", object(), float("nan"), 1j]))
@settings(max_examples=examples(80), deadline=None)
def test_property_a_bad_leaf_anywhere_is_found(value, bad):
    wrapped = {"outer": [value, {"deep": bad}]}
    with pytest.raises(TypeError) as info:
        check_json_value(wrapped, "user_config")
    assert str(info.value).startswith("user_config['outer'][1]['deep'] ")


# --------------------------------------------------------------------------- replica_spec_hash


def spec_hash(version="v1", init="init-a", **options):
    return replica_spec_hash(validate_options(options), version, init)


def test_spec_hash_is_stable_and_short():
    # The same in every process and every release: a hash that changed for the same spec
    # would restart every running replica when the controller is upgraded.
    assert spec_hash() == "e64081901205df72"
    assert re.fullmatch("[0-9a-f]{16}", spec_hash(num_cpus=2, runtime_env={"pip": ["numpy"]}))


@pytest.mark.parametrize(
    "change",
    [
        {"version": "v2"},
        {"init": "init-b"},
        {"num_cpus": 2},
        {"num_cpus": 0.5},
        {"num_gpus": 1},
        {"memory": 2**30},
        {"runtime_env": {"pip": ["numpy"]}},
        {"runtime_env": {"env_vars": {"A": "1"}}},
        {"max_concurrent_queries": 4},
        {"serializer": "pickle"},
    ],
)
def test_spec_hash_changes_with_what_a_process_runs(change):
    assert spec_hash(**change) != spec_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"num_replicas": 7},
        {"num_replicas": 0},
        {"user_config": {"threshold": 0.9}},
        {"max_unavailable": 0.5},
        {"max_surge": 1},
        {"route_prefix": "/other"},
        {"graceful_shutdown_timeout_s": 60},
        {"health_check_period_s": 1},
        {"name": "renamed"},
    ],
)
def test_spec_hash_ignores_scale_config_and_rollout_options(change):
    assert spec_hash(**change) == spec_hash()


@given(
    num_replicas=st.integers(min_value=0, max_value=10_000),
    user_config=JSON,
    version=st.text(min_size=1, max_size=10),
)
@settings(max_examples=examples(60), deadline=None)
def test_property_spec_hash_independent_of_scale_and_user_config(num_replicas, user_config, version):
    base = spec_hash(version=version)
    assert spec_hash(version=version, num_replicas=num_replicas, user_config=user_config) == base


@given(st.text(min_size=1, max_size=10), st.text(min_size=1, max_size=10))
@settings(max_examples=examples(60), deadline=None)
def test_property_spec_hash_tells_versions_apart(a, b):
    assert (spec_hash(version=a) == spec_hash(version=b)) == (a == b)


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_deployment_options_model_rejects_extra_fields():
    with pytest.raises(pydantic.ValidationError):
        DeploymentOptions(num_replica=2)


@pytest.mark.parametrize("name", ["A=B", "", "1ABC", "WITH SPACE", "NUL\0"])
def test_env_var_names_no_process_can_hold_are_refused_up_front(name):
    with pytest.raises(ValueError, match="no process environment can hold"):
        validate_options({"runtime_env": {"env_vars": {name: "1"}}})


def test_env_var_values_with_nul_are_refused_and_ordinary_ones_pass():
    with pytest.raises(ValueError, match="NUL character"):
        validate_options({"runtime_env": {"env_vars": {"A": "x\0y"}}})
    assert validate_options({"runtime_env": {"env_vars": {"_A1": "a=b c"}}}).runtime_env == {"env_vars": {"_A1": "a=b c"}}


@pytest.mark.parametrize("option, value", [("result_ttl_s", 0), ("max_queued_requests", 0),
                                           ("health_check_timeout_s", 0), ("max_deliveries", 0)])
def test_limits_are_positive(option, value):
    with pytest.raises(ValueError, match=f"invalid {option}="):
        validate_options({option: value})


# --------------------------------------------------------------------------- autoscaling_config

AUTO_DEFAULTS = AutoscalingConfig(min_replicas=1, max_replicas=100, target_ongoing_requests=2,
                                  upscale_delay_s=3, downscale_delay_s=60)


def test_no_autoscaling_by_default():
    assert validate_options({}).autoscaling_config is None
    assert validate_options({"num_replicas": 4}).autoscaling_config is None


def test_num_replicas_auto_is_the_default_autoscaling_config_starting_at_min_replicas():
    options = validate_options({"num_replicas": "auto"})
    assert options.autoscaling_config == AUTO_DEFAULTS == AutoscalingConfig()
    assert options.num_replicas == 1 and isinstance(options.num_replicas, int)
    assert validate_options({"autoscaling_config": {}}) == options


def test_autoscaling_config_keys_are_kept_and_the_others_default():
    options = validate_options({"autoscaling_config": {
        "min_replicas": 0, "max_replicas": 10, "target_ongoing_requests": 2.5,
        "upscale_delay_s": 0, "downscale_delay_s": 30.5,
    }})
    assert options.autoscaling_config == AutoscalingConfig(0, 10, 2.5, 0, 30.5)
    assert options.num_replicas == 0        # where it starts: min_replicas
    assert validate_options({"autoscaling_config": {"max_replicas": 10}}).autoscaling_config == AutoscalingConfig(
        max_replicas=10)


def test_num_replicas_auto_with_an_autoscaling_config_uses_its_keys():
    options = validate_options({"num_replicas": "auto", "autoscaling_config": {"min_replicas": 2, "max_replicas": 5}})
    assert options.autoscaling_config == AutoscalingConfig(min_replicas=2, max_replicas=5)
    assert options.num_replicas == 2


def test_an_autoscaling_config_object_is_accepted():
    config = AutoscalingConfig(min_replicas=3, max_replicas=4)
    assert validate_options({"autoscaling_config": config}).autoscaling_config is config


def test_autoscaled_options_survive_the_goal_json():
    options = validate_options({"name": "m", "autoscaling_config": {"max_replicas": 7, "target_ongoing_requests": 1.5}})
    stored = json.loads(json.dumps(options.model_dump()))
    assert stored["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 7, "target_ongoing_requests": 1.5,
                                            "upscale_delay_s": 3, "downscale_delay_s": 60}
    assert DeploymentOptions(**stored) == options


def test_options_over_an_autoscaled_base_keep_its_config():
    base = validate_options({"autoscaling_config": {"min_replicas": 2, "max_replicas": 8}})
    changed = validate_options({"version": "v2", "num_cpus": 2}, base)
    assert changed.autoscaling_config == base.autoscaling_config and changed.num_replicas == 2


def test_a_new_autoscaling_config_starts_from_its_min_replicas():
    base = validate_options({"num_replicas": 5})
    changed = validate_options({"autoscaling_config": {"min_replicas": 2}}, base)
    assert (changed.num_replicas, changed.autoscaling_config.min_replicas) == (2, 2)


def test_autoscaling_config_none_turns_autoscaling_off():
    base = validate_options({"num_replicas": "auto"})
    fixed = validate_options({"num_replicas": 3, "autoscaling_config": None}, base)
    assert (fixed.num_replicas, fixed.autoscaling_config) == (3, None)
    kept = validate_options({"autoscaling_config": None}, base)
    assert (kept.num_replicas, kept.autoscaling_config) == (1, None)     # the count it started from


def _one_clean_sentence(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and "pydantic" not in message and "For further information" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    return message


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_replicas": 3, "autoscaling_config": {"max_replicas": 5}},
         "num_replicas=3 and autoscaling_config cannot be used together: drop num_replicas to autoscale "
         "(from min_replicas to max_replicas), or drop autoscaling_config to run a fixed count"),
        ({"num_replicas": 0, "autoscaling_config": {}},
         "num_replicas=0 and autoscaling_config cannot be used together: drop num_replicas to autoscale "
         "(from min_replicas to max_replicas), or drop autoscaling_config to run a fixed count"),
        ({"num_replicas": "auto", "autoscaling_config": None},
         "num_replicas='auto' turns autoscaling on and autoscaling_config=None turns it off; drop one of them"),
    ],
)
def test_explicit_num_replicas_with_autoscaling_is_refused(options, message):
    with pytest.raises(ValueError) as info:
        validate_options(options)
    assert _one_clean_sentence(info) == message


def test_num_replicas_over_an_autoscaled_base_is_refused_unless_autoscaling_is_turned_off():
    base = validate_options({"autoscaling_config": {"min_replicas": 1, "max_replicas": 10}})
    with pytest.raises(ValueError) as info:
        validate_options({"num_replicas": 3}, base)
    assert _one_clean_sentence(info) == (
        "num_replicas=3 conflicts with the deployment's autoscaling_config (1 to 10 replicas); "
        "pass autoscaling_config=None as well to run a fixed count, or change min_replicas and max_replicas"
    )
    assert validate_options({"num_replicas": 3, "autoscaling_config": None}, base).num_replicas == 3
    assert validate_options({"num_replicas": "auto"}, base).autoscaling_config == AUTO_DEFAULTS


@pytest.mark.parametrize("value", ["Auto", "autoscale", "3", ""])
def test_num_replicas_other_strings_are_refused_naming_auto(value):
    with pytest.raises(TypeError) as info:
        validate_options({"num_replicas": value})
    assert _one_clean_sentence(info) == (
        f"invalid num_replicas={value!r}: Input should be a valid integer; "
        "use a whole number from 0 to 10000, or 'auto' to autoscale"
    )


BAD_AUTOSCALING = [
    # (autoscaling_config, exception type, the whole message)
    (5, TypeError,
     "invalid autoscaling_config=5: use a dict with any of the keys 'min_replicas', 'max_replicas', "
     "'target_ongoing_requests', 'upscale_delay_s' and 'downscale_delay_s', or None for a fixed num_replicas"),
    ("auto", TypeError,
     "invalid autoscaling_config='auto': use a dict with any of the keys 'min_replicas', 'max_replicas', "
     "'target_ongoing_requests', 'upscale_delay_s' and 'downscale_delay_s', or None for a fixed num_replicas"),
    ({"min_replicas": 5, "max_replicas": 2}, ValueError,
     "invalid autoscaling_config: min_replicas=5 is above max_replicas=2; lower min_replicas or raise max_replicas"),
    ({"min_replicas": 101}, ValueError,
     "invalid autoscaling_config: min_replicas=101 is above max_replicas=100 (the default); "
     "lower min_replicas or raise max_replicas"),
    ({"min_replicas": -1}, ValueError,
     "invalid autoscaling_config['min_replicas']=-1: use a whole number from 0 to 10000 (0: no replica while idle)"),
    ({"min_replicas": 1.0}, TypeError,
     "invalid autoscaling_config['min_replicas']=1.0: use a whole number from 0 to 10000 (0: no replica while idle)"),
    ({"min_replicas": True}, TypeError,
     "invalid autoscaling_config['min_replicas']=True: use a whole number from 0 to 10000 (0: no replica while idle)"),
    ({"max_replicas": 10_001}, ValueError,
     "invalid autoscaling_config['max_replicas']=10001: use a whole number from 1 to 10000"),
    ({"max_replicas": 0}, ValueError,
     "invalid autoscaling_config['max_replicas']=0: use a whole number from 1 to 10000"),
    ({"max_replicas": "10"}, TypeError,
     "invalid autoscaling_config['max_replicas']='10': use a whole number from 1 to 10000"),
    ({"max_replicas": None}, TypeError,
     "invalid autoscaling_config['max_replicas']=None: use a whole number from 1 to 10000"),
    ({"target_ongoing_requests": 0}, ValueError,
     "invalid autoscaling_config['target_ongoing_requests']=0: use a number > 0: "
     "the requests each replica should have waiting or in hand"),
    ({"target_ongoing_requests": -2.5}, ValueError,
     "invalid autoscaling_config['target_ongoing_requests']=-2.5: use a number > 0: "
     "the requests each replica should have waiting or in hand"),
    ({"target_ongoing_requests": float("inf")}, ValueError,
     "invalid autoscaling_config['target_ongoing_requests']=inf: use a number > 0: "
     "the requests each replica should have waiting or in hand"),
    ({"target_ongoing_requests": "2"}, TypeError,
     "invalid autoscaling_config['target_ongoing_requests']='2': use a number > 0: "
     "the requests each replica should have waiting or in hand"),
    ({"upscale_delay_s": -1}, ValueError,
     "invalid autoscaling_config['upscale_delay_s']=-1: use a number of seconds from 0 to 86400"),
    ({"downscale_delay_s": -0.5}, ValueError,
     "invalid autoscaling_config['downscale_delay_s']=-0.5: use a number of seconds from 0 to 86400"),
    ({"downscale_delay_s": float("nan")}, ValueError,
     "invalid autoscaling_config['downscale_delay_s']=nan: use a number of seconds from 0 to 86400"),
    ({"downscale_delay_s": 86_401}, ValueError,
     "invalid autoscaling_config['downscale_delay_s']=86401: use a number of seconds from 0 to 86400"),
    ({"upscale_delay_s": [3]}, TypeError,
     "invalid autoscaling_config['upscale_delay_s']=[3]: use a number of seconds from 0 to 86400"),
    ({"max_replica": 5}, TypeError, "unknown autoscaling_config key 'max_replica'; did you mean 'max_replicas'?"),
    ({"target_ongoing_request": 5}, TypeError,
     "unknown autoscaling_config key 'target_ongoing_request'; did you mean 'target_ongoing_requests'?"),
    ({"upscale_delay": 5}, TypeError, "unknown autoscaling_config key 'upscale_delay'; did you mean 'upscale_delay_s'?"),
    ({"cooldown": 5}, TypeError,
     "unknown autoscaling_config key 'cooldown'; the keys are 'min_replicas', 'max_replicas', "
     "'target_ongoing_requests', 'upscale_delay_s' and 'downscale_delay_s'"),
    ({1: 5}, TypeError,
     "unknown autoscaling_config key 1; the keys are 'min_replicas', 'max_replicas', "
     "'target_ongoing_requests', 'upscale_delay_s' and 'downscale_delay_s'"),
]


@pytest.mark.parametrize("value, error, message", BAD_AUTOSCALING, ids=[repr(v)[:40] for v, _, _ in BAD_AUTOSCALING])
def test_bad_autoscaling_config_gives_one_clear_error_naming_the_value_and_the_fix(value, error, message):
    with pytest.raises(error) as info:
        validate_options({"autoscaling_config": value})
    assert type(info.value) is error
    assert _one_clean_sentence(info) == message
    with pytest.raises(error) as direct:
        check_autoscaling_config(value)
    assert str(direct.value) == message


BAD_AUTOSCALING_DICTS = [case for case in BAD_AUTOSCALING if isinstance(case[0], dict)]


@pytest.mark.parametrize("value, error, message", BAD_AUTOSCALING_DICTS,
                         ids=[repr(v)[:40] for v, _, _ in BAD_AUTOSCALING_DICTS])
def test_bad_autoscaling_config_through_num_replicas_auto_is_refused_the_same(value, error, message):
    with pytest.raises(error) as info:
        validate_options({"num_replicas": "auto", "autoscaling_config": value})
    assert str(info.value) == message


def test_autoscaling_config_is_checked_when_built_directly_too():
    with pytest.raises(ValueError, match="is above max_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(TypeError, match=r"autoscaling_config\['max_replicas'\]='5'"):
        AutoscalingConfig(max_replicas="5")
    with pytest.raises(pydantic.ValidationError, match="unknown autoscaling_config key 'bad'"):
        DeploymentOptions(autoscaling_config={"bad": 1})


def test_autoscaling_config_is_one_option_among_the_others():
    assert "autoscaling_config" in OPTION_NAMES
    assert AUTOSCALING_KEYS == ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                                "downscale_delay_s")
    with pytest.raises(TypeError, match="did you mean 'autoscaling_config'"):
        validate_options({"autoscaling_conf": {}})


@given(
    st.integers(0, 10_000), st.integers(1, 10_000),
    st.one_of(st.integers(1, 1000), st.floats(0.001, 1000)),
    st.one_of(st.integers(0, 86_400), st.floats(0, 86_400)),
    st.one_of(st.integers(0, 86_400), st.floats(0, 86_400)),
)
@settings(max_examples=examples(100), deadline=None)
def test_property_autoscaling_configs_pass_exactly_when_min_is_at_most_max(low, high, target, up, down):
    value = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target,
             "upscale_delay_s": up, "downscale_delay_s": down}
    if low <= high:
        options = validate_options({"autoscaling_config": value})
        assert options.autoscaling_config == AutoscalingConfig(**value)
        assert options.num_replicas == low
        assert DeploymentOptions(**json.loads(json.dumps(options.model_dump()))) == options
    else:
        with pytest.raises(ValueError, match=f"min_replicas={low} is above max_replicas={high};"):
            validate_options({"autoscaling_config": value})


def test_decorator_and_options_refuse_num_replicas_with_autoscaling():
    import taskserve

    with pytest.raises(ValueError, match="cannot be used together"):
        taskserve.deployment(num_replicas=2, autoscaling_config={"max_replicas": 3})

    @taskserve.deployment(num_replicas="auto")
    class Model:
        def __call__(self, x):
            return x

    assert Model.config.autoscaling_config == AUTO_DEFAULTS and Model.num_replicas == 1
    with pytest.raises(ValueError, match="pass autoscaling_config=None as well"):
        Model.options(num_replicas=3)
    assert Model.options(num_replicas=3, autoscaling_config=None).num_replicas == 3
    with pytest.raises(TypeError, match="did you mean 'max_replicas'"):
        Model.options(autoscaling_config={"max_replica": 3})


# An autoscaling_config change (same version) restarts nothing.
@pytest.mark.parametrize(
    "change",
    [
        {"num_replicas": "auto"},
        {"autoscaling_config": {"min_replicas": 0, "max_replicas": 3}},
        {"autoscaling_config": {"target_ongoing_requests": 9, "upscale_delay_s": 0, "downscale_delay_s": 600}},
    ],
)
def test_spec_hash_ignores_autoscaling(change):
    assert spec_hash(**change) == spec_hash()
    autoscaled = spec_hash(autoscaling_config={"max_replicas": 10})
    assert spec_hash(**change) == autoscaled


@given(st.integers(0, 50), st.integers(50, 10_000), st.floats(0.01, 100), st.floats(0, 600), st.floats(0, 600))
@settings(max_examples=examples(60), deadline=None)
def test_property_spec_hash_independent_of_autoscaling_config(low, high, target, up, down):
    config = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target,
              "upscale_delay_s": up, "downscale_delay_s": down}
    assert spec_hash(autoscaling_config=config) == spec_hash()


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("options, words", [
    ({"num_replicas": 10_001}, ["num_replicas=10001", "10000"]),
    ({"num_replicas": 10**9}, ["num_replicas=1000000000", "10000"]),
    ({"autoscaling_config": {"max_replicas": 10**9}}, ["max_replicas']=1000000000", "10000"]),
    ({"autoscaling_config": {"min_replicas": 10_001, "max_replicas": 10_000}}, ["min_replicas']=10001", "10000"]),
    ({"max_concurrent_queries": 1001}, ["max_concurrent_queries=1001", "1000"]),
    ({"max_ongoing_requests": 10**6}, ["1000000", "1000"]),
    ({"max_queued_requests": 10**7 + 1}, ["max_queued_requests=10000001", "10000000"]),
    ({"max_deliveries": 101}, ["max_deliveries=101", "100"]),
    ({"canary": {"traffic_percent": 10, "min_requests": 10**9 + 1}}, ["min_requests']=1000000001", "1000000000"]),
    ({"runtime_env": {"pip": ["x"] * 10_001}}, ["10001 requirements", "10000"]),
    ({"runtime_env": {"env_vars": {f"V{i}": "1" for i in range(1001)}}}, ["1001 variables", "1000"]),
])
def test_every_count_is_bounded_with_one_error_naming_the_value_and_the_limit(options, words):
    with pytest.raises((TypeError, ValueError)) as caught:
        validate_options({**options, "version": "2"})
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_a_goal_read_from_redis_is_checked_as_deploy_checks_options():
    """What the controller and the status readers do with a goal that may have been
    written by hand: its options and count within the same bounds, one sentence otherwise."""
    held = validate_options({"num_replicas": "auto"}).model_dump()
    held.pop("num_replicas")
    assert check_goal_options(held, 1).autoscaling_config.max_replicas == 100
    for options, count, words in (({}, 10**9, "num_replicas=1000000000"),
                                  ({"num_cpu": 1}, 1, "did you mean 'num_cpus'"),
                                  ({"autoscaling_config": "many"}, 1, "autoscaling_config='many'"),
                                  ({"max_concurrent_queries": "8"}, 1, "max_concurrent_queries='8'")):
        with pytest.raises((TypeError, ValueError), match=re.escape(words)):
            check_goal_options(options, count)
