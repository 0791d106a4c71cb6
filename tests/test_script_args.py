"""The Script's argument rules, shared by the UI, ``script_args`` and OneDiff's request forms."""
import pytest
from sd_webui_onediff.script_args import (
    NO_CACHE,
    SCRIPT_TITLE,
    ScriptArgs,
    ScriptArgsError,
    normalize_request,
    parse_script_args,
)


@pytest.mark.parametrize(
    "values, expected",
    [
        (None, ScriptArgs()),
        ([], ScriptArgs()),
        ([True], ScriptArgs(quantization=True)),
        ([{"0": True}], ScriptArgs(quantization=True)),
        ({"1": "sdxl-h100", "3": True}, ScriptArgs(compiler_cache="sdxl-h100", always_recompile=True)),
        ([False, None, ""], ScriptArgs()),
        ([False, "mine", " saved ", 1], ScriptArgs(compiler_cache="mine", saved_cache_name="saved", always_recompile=True)),
        ([0, "None", "", False], ScriptArgs()),
    ],
)
def test_accepted_forms(values, expected):
    assert parse_script_args(values) == expected


@pytest.mark.parametrize(
    "values, index, name",
    [
        (["yes"], 0, "quantization"),
        ([False, 5], 1, "compiler_cache"),
        ([False, "None", ["x"]], 2, "saved_cache_name"),
        ([False, "None", "", "on"], 3, "always_recompile"),
        ([2], 0, "quantization"),
        ([False, "None", "", False, "extra"], 4, "script_args"),
        ([{"7": True}], 0, "script_args"),
        ("quantization", 0, "script_args"),
    ],
)
def test_wrong_types_name_the_argument(values, index, name):
    with pytest.raises(ScriptArgsError) as raised:
        parse_script_args(values)
    assert (raised.value.index, raised.value.name) == (index, name)
    assert f"script_args[{index}] ({name})" in str(raised.value)


def test_full_list_keeps_ui_order():
    assert ScriptArgs().as_list() == [False, NO_CACHE, "", False]


def test_request_with_onediffs_script_field_becomes_script_name():
    body = normalize_request({"prompt": "a cat", "script": SCRIPT_TITLE, "script_args": [True]})
    assert body["script_name"] == SCRIPT_TITLE
    assert body["script_args"] == [True, NO_CACHE, "", False]
    assert body["prompt"] == "a cat"


def test_other_scripts_are_left_alone():
    body = {"script_name": "x/y/z plot", "script_args": [1, "a"]}
    assert normalize_request(body) == body
    assert normalize_request({"prompt": "no script"}) == {"prompt": "no script"}


def test_script_name_wins_over_script():
    body = {"script_name": "prompt matrix", "script": SCRIPT_TITLE, "script_args": [1]}
    assert normalize_request(body) == body


def test_bad_args_in_a_request_raise():
    with pytest.raises(ScriptArgsError):
        normalize_request({"script_name": "OneDiff_Diffusion_Model", "script_args": ["no"]})
