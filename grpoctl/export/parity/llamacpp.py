"""The GGUF's side of parity, in llama.cpp: its log-probabilities and greedy answer on the probes, and whether
it tokenizes and templates a chat as the trained tokenizer does in transformers.

The chat checks: the ids llama-server sends for the rendered chat are transformers' ids with one BOS, every
end-of-turn token is an end-of-generation token, and the chat template in the file, rendered by llama.cpp's
own engine (llama-server), gives the prompt the HF tokenizer's gives on the hard conversations of the Ollama
check.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from grpoctl.errors import ConversionError, InputNotFoundError
from grpoctl.export.parity.probes import GREEDY_QUESTION, GREEDY_TOKENS, Probe, conversation, render


def open_gguf(path: Path, n_ctx: int):
    """Load a GGUF in llama.cpp; a file llama.cpp cannot load is a failed conversion."""
    import llama_cpp

    try:
        # mmap: the file's pages are the page cache's, not the process's memory
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
                               n_threads=_threads(), use_mmap=True)
    except Exception as e:
        raise ConversionError(f"llama.cpp cannot load {path.name}: {e}") from None


def _threads() -> int:
    from grpoctl.threads import default_threads

    return default_threads()


def gguf_logprobs(llm: Any, probes: list[Probe], label: str = "llama.cpp") -> list[Any]:
    """Log-probabilities at every probe position, each probe teacher-forced on its own ids."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    out = []
    for p in tqdm(probes, desc=f"parity: {label}", unit="probe", leave=False):
        llm.reset()
        llm.eval(p.ids)
        scores = torch.from_numpy(np.array(llm.scores[: len(p.ids)], dtype=np.float32))
        out.append(torch.log_softmax(scores, dim=-1))
    return out


def greedy_gguf(llm: Any, prompt_ids: list[int]) -> str:
    """llama.cpp's greedy answer to ``prompt_ids`` (GREEDY_TOKENS at most), to set beside the reference's."""
    llm.reset()
    out = llm.create_completion(prompt=prompt_ids, max_tokens=GREEDY_TOKENS, temperature=0.0, top_k=1)
    return out["choices"][0]["text"].strip()


def tokenizer_checks(llm: Any, path: Path, tokenizer: Any, system_prompt: str, eot_ids: list[int]) -> dict[str, Any]:
    """BOS once, same ids as HF for the rendered chat, end-of-turn tokens are EOG, and the chat template in
    ``path`` renders in llama.cpp's own engine what the trained tokenizer renders in transformers
    (:func:`template_check`)."""
    import llama_cpp
    from gguf.constants import Keys

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = llm.token_bos()
    checks: dict[str, Any] = {}
    if getattr(tokenizer, "chat_template", None) is None:
        return {"template": "none", "ok": True}
    conv = conversation(system_prompt, GREEDY_QUESTION)
    text = render(tokenizer, conv, True)
    hf_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ll_ids = served_ids(llm, text)
    leading_bos = 0
    while leading_bos < len(ll_ids) and ll_ids[leading_bos] == bos:
        leading_bos += 1
    # the template decides whether a BOS belongs in front; what the server sends must hold it once
    expected = int(tokenizer.bos_token_id is not None and hf_ids[:1] == [tokenizer.bos_token_id])
    checks["bos_count"] = leading_bos if bos >= 0 else 0
    checks["bos_once"] = checks["bos_count"] == expected
    checks["chat_ids_match"] = ll_ids == hf_ids
    checks["chat_tokens"] = len(hf_ids)
    checks["eog"] = {tokenizer.convert_ids_to_tokens(t): bool(llama_cpp.llama_vocab_is_eog(vocab, t)) for t in eot_ids}
    if llm.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE) is None:
        checks["template_matches"] = False
        checks["template"] = "missing from the GGUF"
    else:
        checks["template"] = template_check(path, tokenizer, system_prompt,
                                            bool(llama_cpp.llama_vocab_get_add_bos(vocab)))
        checks["template_matches"] = checks["template"]["passed"]  # None: not checked, and the report says why
    checks["ok"] = bool(checks["bos_once"] and checks["chat_ids_match"] and all(checks["eog"].values())
                        and checks["template_matches"] is not False)
    checks["prompt_ids"] = hf_ids
    return checks


def served_ids(llm: Any, text: str) -> list[int]:
    """The token ids llama-server sends the model for a chat prompt rendered to ``text``.

    llama.cpp's chat layer (``common/chat.cpp``, after rendering the template) cuts a leading BOS text off the
    prompt when the model's vocabulary adds a BOS itself, and the server tokenizes the prompt with special tokens
    added (``tokenize_input_prompts(..., add_special=true, parse_special=true)``): one BOS either way, whether
    the template writes it (Gemma, Llama 3) or not. (llama-cpp-python's server renders with the BOS text and
    tokenizes without adding one, which gives the same ids.)
    """
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = llm.token_bos()
    if bos >= 0 and llama_cpp.llama_vocab_get_add_bos(vocab):
        bos_text = llm.detokenize([bos], special=True).decode("utf-8", errors="replace")
        if bos_text and text.startswith(bos_text):
            text = text[len(bos_text):]
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def template_check(path: Path, tokenizer: Any, system_prompt: str, add_bos: bool) -> dict[str, Any]:
    """The GGUF's chat template as llama.cpp serves it against the trained tokenizer's in transformers.

    Rendered by llama-server's ``POST /apply-template`` (llama.cpp's chat layer and C++ Jinja engine, what
    llama-server and Ollama's native chat run) and by ``apply_chat_template``, on the hard conversations of
    the Ollama template check (``gorender.conversations``: whitespace around message text, reasoning then
    whitespace after the end marker, system prompts, think on and off) that end with a user turn; dates
    are rendered on the day of the check (llama-server reads the real clock). Where llama.cpp departs from
    transformers, the trained tokenizer's template is rendered by llama.cpp too: the same departure there is
    llama.cpp's chat layer (``engine_departures``, reported), a different one is the file's template
    (``departures``, which fails the check). ``passed`` is None, with ``skipped`` saying why, when
    llama.cpp's tools are not built.
    """
    from grpoctl.errors import DependencyError
    from grpoctl.llamacpp_tools import apply_template, llama_server, tool

    try:
        tool("llama-server", build=False)
    except (DependencyError, InputNotFoundError) as err:
        return {"passed": None, "skipped": f"chat template not rendered by llama.cpp's engine: {err}"}
    convs = _template_conversations(tokenizer, system_prompt)
    bos = tokenizer.bos_token if add_bos and tokenizer.bos_token else ""  # llama.cpp strips it, adds the token
    expected = {c.name: _hf_prompt(tokenizer, c, bos) for c in convs}

    def kwargs(c: Any) -> dict[str, bool]:
        return {} if c.think is None else {"enable_thinking": c.think}

    result: dict[str, Any] = {"engine": "llama-server POST /apply-template (llama.cpp's chat layer, C++ Jinja)",
                              "reference": "transformers apply_chat_template, the trained tokenizer",
                              "conversations": [c.name for c in convs]}
    try:
        with llama_server(path) as url:
            got = {c.name: apply_template(url, c.messages, kwargs(c)) for c in convs}
        differ = [c for c in convs if not _same(expected[c.name], got[c.name])]
        engine: dict[str, tuple[str, str]] = {}
        if differ:  # the file's template, or llama.cpp's chat layer on any copy of the trained template?
            with tempfile.TemporaryDirectory(prefix="grpoctl-template-") as tmp:
                trained = Path(tmp) / "chat_template.jinja"
                trained.write_text(_template_text(tokenizer))
                with llama_server(path, trained) as url:
                    engine = {c.name: apply_template(url, c.messages, kwargs(c)) for c in differ}
    except DependencyError as err:  # the tools are there, so the file is what llama-server could not load
        return {**result, "passed": False, "error": str(err), "departures": [], "engine_departures": []}

    def case(c: Any) -> dict[str, str]:
        (hf, hf_err), (ll, ll_err) = expected[c.name], got[c.name]
        return {"name": c.name, "shape": c.shape, "expected": hf or f"<error: {hf_err}>",
                "got": ll or f"<error: {ll_err}>"}

    result["departures"] = [case(c) for c in differ if engine[c.name] != got[c.name]]
    result["engine_departures"] = [case(c) for c in differ if engine[c.name] == got[c.name]]
    result["passed"] = not result["departures"]
    return result


def _template_text(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    return template if isinstance(template, str) else tokenizer.get_chat_template()


def _template_conversations(tokenizer: Any, system_prompt: str) -> list[Any]:
    from grpoctl.chatprobes import THINK_OPEN_TAGS, conversations

    template = _template_text(tokenizer)
    markers = next(((o, "</" + o[1:]) for o in THINK_OPEN_TAGS if "</" + o[1:] in template), ("<think>", "</think>"))
    # llama-server renders on its own clock and continues a final assistant turn its own way (reasoning parsed
    # out of it), so the probes are the conversations that ask for a reply
    return [c for c in conversations(system_prompt, markers) if c.ends_with_user and c.day is None]


def _hf_prompt(tokenizer: Any, conv: Any, bos: str) -> tuple[str, str]:
    try:
        text = tokenizer.apply_chat_template(conv.messages, tokenize=False, add_generation_prompt=True,
                                             **({} if conv.think is None else {"enable_thinking": conv.think}))
    except Exception as err:  # the template's raise_exception, a missing key ...: llama.cpp must refuse too
        return "", str(err) or "error"
    return (text[len(bos):] if bos and text.startswith(bos) else text), ""


def _same(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Both render the same prompt, or both refuse the conversation."""
    return bool(a[1]) == bool(b[1]) and (bool(a[1]) or a[0] == b[0])
