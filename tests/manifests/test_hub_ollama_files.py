"""The files `ollama run hf.co/OWNER/REPO` reads from the GGUF repo (``template``, ``system``, ``params``) say
what the Modelfile says.

Neither the Hub nor Ollama runs here: the file names and formats follow the Hub's page "Use Ollama with any GGUF
Model on Hugging Face Hub" (hub-docs docs/hub/ollama.md, *Custom Chat Template and Parameters*), and how Ollama
reads them follows its source (server/images.go GetModel: the template and system layers are the files' bytes,
the params layer is JSON decoded into a map that api/types.go ``Options.FromMap`` types), hence the test names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grpoctl.artifacts import Artifacts
from grpoctl.manifests.api import ManifestOptions, write_manifests
from grpoctl.manifests.modelfile import PARAM_TYPES, read_modelfile
from grpoctl.rundir import RunDir
from tests.manifests.conftest import TEMPLATES, write_export, write_run

HUB_FILES = ("template", "system", "params")


def ollama_options_from_params(text: str) -> dict:
    """``params`` as Ollama applies it: json.Decode into map[string]any, then Options.FromMap, which accepts for
    an int field a JSON number (truncated), for a float32 field a number, for a bool a bool, for ``stop`` an
    array of strings, and fails the model load on anything else."""
    out = {}
    for key, val in json.loads(text).items():
        kind = PARAM_TYPES.get(key, str)
        number = isinstance(val, (int, float)) and not isinstance(val, bool)
        if kind is int and number:
            out[key] = int(val)
        elif kind is float and number:
            out[key] = float(val)
        elif kind is bool and isinstance(val, bool) or kind is str and isinstance(val, str):
            out[key] = val
        elif kind is list and isinstance(val, list) and all(isinstance(v, str) for v in val):
            out[key] = list(val)
        else:
            raise ValueError(f"option {key!r} must be of type {kind.__name__}")
    return out


def hub_files_departures(gguf_dir: Path) -> list[str]:
    """Where the Hub files say something other than the Modelfile in ``gguf_dir``; [] when they agree."""
    mf = read_modelfile(gguf_dir / "Modelfile")
    got = {n: (gguf_dir / n).read_bytes().decode() if (gguf_dir / n).is_file() else None for n in HUB_FILES}
    out = []
    if mf.template is not None and got["template"] != mf.template:
        out.append("template")
    if got["system"] != (mf.system or None):
        out.append("system")
    try:
        if got["params"] is None or ollama_options_from_params(got["params"]) != mf.parameters:
            out.append("params")
    except ValueError:
        out.append("params")
    return out


@pytest.fixture()
def smollm2_style_export(tmp_path, tiny_qwen3, go_renderer):
    """A run whose chat template (SmolLM2's) Ollama's registry would replace, so the Modelfile has a TEMPLATE."""
    run = write_run(tmp_path / "run", tiny_qwen3, reasoning=False,
                    system_prompt="Think, then answer.\nEnd with #### N.")
    export = write_export(run, quants=("Q4_K_M", "Q8_0"))
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=TEMPLATES / "smollm2.jinja"))
    return run, export


def test_hub_files_carry_the_modelfiles_template_system_and_parameters_per_hub_docs(smollm2_style_export):
    run, export = smollm2_style_export
    gguf = export / "gguf"
    mf = read_modelfile(gguf / "Modelfile")
    assert mf.template and "You are a helpful AI assistant named SmolLM" in mf.template
    assert (gguf / "template").read_text(encoding="utf-8") == mf.template  # byte for byte: no newline added
    assert (gguf / "system").read_text(encoding="utf-8") == "Think, then answer.\nEnd with #### N." == mf.system
    params = json.loads((gguf / "params").read_text())
    assert params["stop"] == mf.parameters["stop"] and params["num_ctx"] == 1536 and params["temperature"] == 1.0
    assert hub_files_departures(gguf) == []
    manifest = Artifacts.load(export)
    kinds = {f.path: f.kind for f in manifest.files}
    assert {kinds[f"gguf/{n}"] for n in HUB_FILES} == {"manifest"}
    assert manifest.manifests.ollama.hub_files == ["params", "system", "template"]


def test_params_decode_like_the_modelfiles_parameters_per_ollama_source(smollm2_style_export):
    _, export = smollm2_style_export
    mf = read_modelfile(export / "gguf" / "Modelfile")
    options = ollama_options_from_params((export / "gguf" / "params").read_text())
    assert options == mf.parameters
    assert isinstance(options["num_ctx"], int) and isinstance(options["top_p"], float)


@pytest.mark.parametrize("name,broken", [
    ("template", lambda t: t.replace("<|im_start|>", "<|im_start|> ", 1)),
    ("system", lambda t: t + "\n"),  # Ollama keeps the newline: a different system prompt
    ("params", lambda t: json.dumps({**json.loads(t), "stop": "<|im_end|>"})),  # FromMap refuses a string
    ("params", lambda t: json.dumps({**json.loads(t), "temperature": 0.7})),
])
def test_check_catches_a_hub_file_that_departs_from_the_modelfile_per_ollama_source(smollm2_style_export, name,
                                                                                       broken):
    _, export = smollm2_style_export
    path = export / "gguf" / name
    path.write_text(broken(path.read_text()))
    assert hub_files_departures(export / "gguf") == [name]


def test_without_a_checked_go_template_only_system_and_params_are_written(tmp_path, tiny_qwen3, go_renderer):
    """The tiny Qwen3-style template has no faithful Go template: no ``template`` file (the Hub picks one), and
    a note says so."""
    run = write_run(tmp_path / "run", tiny_qwen3)
    export = write_export(run)
    written = write_manifests(export, run=RunDir(run))
    assert not (export / "gguf" / "template").exists()
    assert (export / "gguf" / "system").read_text() == "Reason step by step. End with #### N."
    assert hub_files_departures(export / "gguf") == []
    assert any("uses the template the Hub picks" in n for n in written.section.notes)


def test_no_system_leaves_no_system_file(smollm2_style_export):
    run, export = smollm2_style_export
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=TEMPLATES / "smollm2.jinja",
                                                                     no_system=True))
    assert not (export / "gguf" / "system").exists()
    assert "gguf/system" not in {f.path for f in Artifacts.load(export).files}
    assert hub_files_departures(export / "gguf") == []
