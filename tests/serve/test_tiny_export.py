"""The real llama.cpp server on a tiny Qwen3 export made by `grpoctl export` (chat template with a
`<think>` pre-fill). Skipped where this build has no GGUF exporter."""

from __future__ import annotations

import json

import httpx
import jinja2
import pytest

from grpoctl.serve.api import ServeOptions, serve
from grpoctl.serve.gguf_info import read_gguf_info
from grpoctl.serve.llamacpp import LlamaCppServer, free_port
from grpoctl.serve.source import resolve_target
from tests.serve.exports import write_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_qwen3):
    try:
        from grpoctl.export.gguf import export_gguf
    except ImportError:
        pytest.skip("GGUF exporter (grpoctl.export.gguf) not in this build")
    from grpoctl.artifacts import Artifacts

    run = write_run(tmp_path_factory.mktemp("tiny") / "run", system_prompt="Answer with a number.",
                    max_seq_length=512)
    manifest = Artifacts(root=run / "export")
    export_gguf(tiny_qwen3, None, run / "export" / "gguf", ["q4_k_m"], name="tiny-qwen3", artifacts=manifest,
                parity_gate=False)
    manifest.save()
    return run


def test_tiny_export_is_served_with_its_own_template(tiny_run, tmp_path):
    target = resolve_target(tiny_run)
    info = read_gguf_info(target.gguf)
    assert "<think>" in info.chat_template
    messages = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2+2?"}]
    rendered = jinja2.Environment().from_string(info.chat_template).render(messages=messages,
                                                                           add_generation_prompt=True)
    assert rendered.endswith("<think>\n")  # the Qwen3-style generation prompt pre-fills the reasoning block
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(target.gguf), vocab_only=True, verbose=False)
    expected = len(vocab.tokenize(rendered.encode(), add_bos=False, special=True))
    with LlamaCppServer(gguf=target.gguf, port=free_port(), n_ctx=512, alias="tiny",
                        log_path=tmp_path / "server.log") as server:
        server.start()
        server.wait_ready(60)
        r = httpx.post(server.base_url + "/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200
        assert r.json()["usage"]["prompt_tokens"] == expected
        body = {"messages": messages, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as s:
            events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_tiny_export_smoke(tiny_run):
    lines: list[str] = []
    assert serve(ServeOptions(source=tiny_run, port=0, smoke=True, max_tokens=8), echo=lines.append) == 0
    assert "(n_ctx 512)" in lines[0]
    assert "smoke: ok" in lines[-1] or "smoke: ok" in "\n".join(lines)
