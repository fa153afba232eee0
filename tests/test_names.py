from __future__ import annotations

import argparse

import pytest

from grpoctl.names import safe_name


@pytest.mark.parametrize("raw, name", [
    ("SmolLM2-135M-Instruct-my run", "SmolLM2-135M-Instruct-my-run"),
    ("-leading dash", "leading-dash"),
    ("a=b,c  d", "a-b-c-d"),
    ("..hidden.", "hidden"),
    ("实验 1", "实验-1"),
    (" \t", "model"),
])
def test_names_from_paths_are_what_file_systems_and_argument_parsers_take(raw, name):
    assert safe_name(raw) == name
    # the shape vLLM's argparse reads as a value, not as an option
    parser = argparse.ArgumentParser()
    parser.add_argument("--served-model-name")
    assert parser.parse_args(["--served-model-name", safe_name(raw)]).served_model_name == name
