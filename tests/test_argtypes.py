"""Wrong-typed calls of the Python API are one grpoctl UsageError naming the option, never Python's own TypeError,
AttributeError or OverflowError from deep in a stage, and never after work has started (a server announced)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest

import grpoctl.api as api
from grpoctl.argtypes import Range, check_value
from grpoctl.errors import GrpoctlError, UsageError

EO, MO, SO = api.ExportOptions, api.ManifestOptions, api.ServeOptions

WRONG_CALLS = {
    # export(source, options, *, manifests, log)
    "export(123)": lambda: api.export(123),
    "export(None)": lambda: api.export(None),
    "export(b'run')": lambda: api.export(b"run"),
    "export(run, options=5)": lambda: api.export("run", 5),
    "export(run, options=dict)": lambda: api.export("run", {"gguf": "q8_0"}),
    "export(run, manifests='yes')": lambda: api.export("run", manifests="yes"),
    "export(run, log=5)": lambda: api.export("run", log=5),
    "export(run, bogus=1)": lambda: api.export("run", bogus=1),
    "export()": lambda: api.export(),
    # ExportOptions
    "ExportOptions(gguf=5)": lambda: EO(gguf=5),
    "ExportOptions(gguf=[5])": lambda: EO(gguf=[5]),
    "ExportOptions(merged=16)": lambda: EO(merged=16),
    "ExportOptions(dtype=None)": lambda: EO(dtype=None),
    "ExportOptions(lora='yes')": lambda: EO(lora="yes"),
    "ExportOptions(output_dir=5)": lambda: EO(output_dir=5),
    "ExportOptions(force=1)": lambda: EO(force=1),
    "ExportOptions(parity_gate='no')": lambda: EO(parity_gate="no"),
    "ExportOptions(imatrix=3)": lambda: EO(imatrix=3),
    "ExportOptions(calibration=1.5)": lambda: EO(calibration=1.5),
    "ExportOptions(base=['x'])": lambda: EO(base=["x"]),
    # ManifestOptions
    "ManifestOptions(tensor_parallel_size='two')": lambda: MO(tensor_parallel_size="two"),
    "ManifestOptions(tensor_parallel_size=2.0)": lambda: MO(tensor_parallel_size=2.0),
    "ManifestOptions(data_parallel_size=1.5)": lambda: MO(data_parallel_size=1.5),
    "ManifestOptions(port='8000')": lambda: MO(port="8000"),
    "ManifestOptions(port=None)": lambda: MO(port=None),
    "ManifestOptions(gpu_memory_utilization='high')": lambda: MO(gpu_memory_utilization="high"),
    "ManifestOptions(served_model_name=['m'])": lambda: MO(served_model_name=["m"]),
    "ManifestOptions(no_system='false')": lambda: MO(no_system="false"),
    "ManifestOptions(chat_template=7)": lambda: MO(chat_template=7),
    "ManifestOptions(quant=8)": lambda: MO(quant=8),
    # ServeOptions
    "ServeOptions(port=70000)": lambda: SO(source="m.gguf", port=70000),
    "ServeOptions(port=-1)": lambda: SO(source="m.gguf", port=-1),
    "ServeOptions(port='8080')": lambda: SO(source="m.gguf", port="8080"),
    "ServeOptions(source=None)": lambda: SO(source=None),
    "ServeOptions(source=5)": lambda: SO(source=5),
    "ServeOptions(ctx='4k')": lambda: SO(source="m.gguf", ctx="4k"),
    "ServeOptions(ctx=0)": lambda: SO(source="m.gguf", ctx=0),
    "ServeOptions(detach='yes')": lambda: SO(source="m.gguf", detach="yes"),
    "ServeOptions(max_tokens=0)": lambda: SO(source="m.gguf", max_tokens=0),
    "ServeOptions(ready_timeout='2m')": lambda: SO(source="m.gguf", ready_timeout="2m"),
    "ServeOptions(host=127)": lambda: SO(source="m.gguf", host=127),
    # the other functions
    "serve('m.gguf')": lambda: api.serve("m.gguf"),
    "serve(options, echo=5)": lambda: api.serve(SO(source="m.gguf"), echo=5),
    "write_manifests(5)": lambda: api.write_manifests(5),
    "write_manifests(run, options=ExportOptions())": lambda: api.write_manifests("run", EO()),
    "push(5, repo)": lambda: api.push(5, "alice/x"),
    "push(run, 5)": lambda: api.push("run", 5),
    "push(run, repo, what=5)": lambda: api.push("run", "alice/x", what=5),
    "push(run, repo, private='yes')": lambda: api.push("run", "alice/x", private="yes"),
    "push(run, repo, bogus=1)": lambda: api.push("run", "alice/x", bogus=1),
    "push(run, repo, num_threads='4')": lambda: api.push("run", "alice/x", num_threads="4"),
    "train(123)": lambda: api.train(123),
    "train(overrides='a.b=1')": lambda: api.train(None, overrides="a.b=1"),
    "evaluate(5)": lambda: api.evaluate(5),
    "evaluate(run, samples='20')": lambda: api.evaluate("run", samples="20"),
    "evaluate(run, seed=1.5)": lambda: api.evaluate("run", seed=1.5),
}


def test_the_matrix_covers_every_public_function_and_options_class():
    assert len(WRONG_CALLS) >= 48
    for name in ("export", "ExportOptions", "ManifestOptions", "ServeOptions", "serve", "write_manifests", "push",
                 "train", "evaluate"):
        assert any(call.startswith(name + "(") for call in WRONG_CALLS), name


@pytest.mark.parametrize("call", sorted(WRONG_CALLS))
def test_wrong_typed_api_call_raises_a_grpoctl_usage_error_before_any_work(call, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a relative path the check let through would find nothing here
    with pytest.raises(GrpoctlError) as info:
        WRONG_CALLS[call]()
    assert isinstance(info.value, UsageError), f"{call}: {type(info.value).__name__}: {info.value}"
    assert len(str(info.value).splitlines()) == 1
    out = capsys.readouterr()
    assert "starting" not in out.out + out.err  # refused before a server was announced
    assert list(tmp_path.iterdir()) == []  # and before anything was written


def test_right_types_pass_and_are_fitted():
    opts = SO(source="m.gguf", port=0, ready_timeout=5)
    assert opts.source == Path("m.gguf") and opts.port == 0  # a str path becomes a Path; 0 picks a free port
    assert EO(gguf=("q8_0",), output_dir="out").gguf == ["q8_0"]
    assert MO(gpu_memory_utilization=1, tensor_parallel_size=2).tensor_parallel_size == 2


@pytest.mark.parametrize("value,hint", [(True, int), (float("nan"), float), (70000, Annotated[int, Range(0, 65535)]),
                                        ("", Path), (["a", 1], list[str]), ({"a": "b"}, dict[str, int])])
def test_check_value_refuses_what_python_would_accept_silently(value, hint):
    with pytest.raises(UsageError, match="should be"):
        check_value(value, hint, "x")
