"""Serve reads the Modelfile the manifests step wrote for the GGUF it serves."""

from __future__ import annotations

from grpoctl.manifests.modelfile import parse_modelfile

# Written by `grpoctl manifests` for a tiny Qwen3 export (chat template with a <think> pre-fill).
GENERATED = '''# Ollama Modelfile written by grpoctl from the model's own chat template and training settings.
# Create the model: ollama create <name> -f <this file>
FROM ./tiny-Q4_1.gguf
TEMPLATE """{{ if $.System }}<|im_start|>system
{{ $.System }}<|im_end|>
{{ end -}}
{{ range $i, $m := $.Messages -}}
{{ $last := eq (len (slice $.Messages $i)) 1 -}}
{{ if eq $m.Role "user" }}<|im_start|>user
{{ $m.Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
<think>
{{ end -}}
{{ else if eq $m.Role "assistant" }}<|im_start|>assistant
{{ $m.Content -}}
{{ if not $last }}<|im_end|>
{{ end -}}
{{ end -}}
{{ end }}"""
SYSTEM Answer with a number.
PARAMETER stop <|im_end|>
PARAMETER stop <|im_start|>
PARAMETER num_ctx 512
'''


def test_generated_modelfile_reads_back_exactly():
    mf = parse_modelfile(GENERATED)
    assert mf.from_ == "./tiny-Q4_1.gguf"
    assert mf.template.startswith("{{ if $.System }}<|im_start|>system\n")
    assert "<|im_start|>assistant\n<think>\n{{ end -}}" in mf.template
    assert mf.template.endswith("{{ end -}}\n{{ end }}")
    assert mf.system == "Answer with a number."
    assert mf.parameters == {"stop": ["<|im_end|>", "<|im_start|>"], "num_ctx": 512}


def test_the_modelfile_naming_the_served_quant_is_chosen(tmp_path, smol_gguf):
    from grpoctl.serve.gguf_info import read_gguf_info
    from grpoctl.serve.ollama import plan_registration
    from grpoctl.serve.source import resolve_target
    from tests.serve.exports import make_export, write_run

    run = write_run(tmp_path / "run")
    manifest = make_export(run / "export", {"q4_1": smol_gguf, "q8_0": smol_gguf},
                           modelfile=GENERATED.replace("tiny-Q4_1", "SmolLM2-135M-Instruct-Q4_1"))
    q8 = run / "export" / "gguf" / "Modelfile.Q8_0"
    q8.write_text(GENERATED.replace("tiny-Q4_1", "SmolLM2-135M-Instruct-Q8_0").replace("num_ctx 512", "num_ctx 256"))
    manifest.add_file(q8, "modelfile")
    manifest.save()
    info = read_gguf_info(smol_gguf)
    for quant, ctx, source in (("q4_1", 512, "Modelfile"), ("q8_0", 256, "Modelfile.Q8_0")):
        reg = plan_registration(resolve_target(run, quant), info, "m", 1024)
        assert reg.source.endswith("/gguf/" + source)
        assert reg.parameters["num_ctx"] == ctx
