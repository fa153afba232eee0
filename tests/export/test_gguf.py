"""GGUF export on the tiny Llama/Qwen2/Qwen3 fixtures with llama.cpp's real converter, quantizer and runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from grpoctl.artifacts import Artifacts
from grpoctl.errors import ConversionError, DataError, DiskFullError, ParityError, UsageError
from grpoctl.export import gguf as gg
from grpoctl.export.converter import find_converter
from grpoctl.export.parity.llamacpp import open_gguf
from grpoctl.export.parity.measure import measure
from grpoctl.export.parity.reference import ENV_REFERENCE, load_reference, prepare_reference
from grpoctl.export.parity.scoring import DEFAULT_FLOORS, MIN_CONFIDENCE, Floor, parse_floors
from grpoctl.gguftypes import parse_types
from tests.export import adapters
from tests.export.adapters import VARIANTS, peft_merged_folder
from tests.export.gguf_support import make_adapter, read_gguf


@pytest.fixture(scope="module")
def converter():
    return find_converter(fetch=True)


@pytest.fixture(scope="module")
def qwen3_adapter(tiny_models, tmp_path_factory) -> Path:
    return make_adapter(tiny_models["qwen3"], tmp_path_factory.mktemp("adapter") / "adapter")


def _convert(converter, model_dir, out, outtype="bf16", adapter=None, name="tiny"):
    eot = gg.end_of_turn_ids(model_dir)
    info = gg.convert(converter, model_dir, adapter, out, outtype, name=name, eot_ids=eot,
                      metadata=gg.gguf_metadata(name, model_dir, adapter))
    return info


def test_parse_types_normalises_and_rejects_unknown():
    assert parse_types("Q8_0, q4_k_m,q4_k_m,q5-k-m") == ["q8_0", "q4_k_m", "q5_k_m"]
    with pytest.raises(UsageError) as err:
        parse_types("q4_k_m,q3_x")
    assert "'q3_x'" in str(err.value) and "q4_k_m" in str(err.value) and "q8_0" in str(err.value)
    assert gg.gguf_filename("SmolLM2-135M-Instruct-grpo", "q4_k_m") == "SmolLM2-135M-Instruct-grpo-Q4_K_M.gguf"


def _differing(a: Path, b: Path) -> list[str]:
    """Names of the tensors whose type or bytes differ between two GGUF files (all of them, if the sets differ)."""
    _, at = read_gguf(a)
    _, bt = read_gguf(b)
    if at.keys() != bt.keys():
        return sorted(set(at) ^ set(bt))
    return [k for k in bt if at[k] != bt[k]]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fused_gguf_equals_converting_peft_merged_folder_and_passes_parity(converter, variant, tmp_path, name):
    """For every adapter shape (adapters.VARIANTS: plain LoRA, rsLoRA, rank/alpha patterns, DoRA, modules_to_save of
    lm_head or embed_tokens, embedding LoRA, lora_bias, tied embeddings untied or kept tied): the fused GGUF has
    exactly the tensors llama.cpp's converter writes for PEFT's merge_and_unload + save_pretrained folder (in f16
    also with the direct bf16 -> f16 narrowing; Llama's q/k permute), and the parity gate, whose reference is
    PEFT's merge, passes it."""
    base, adapter, peft_dir = variant(name)
    outtype = "bf16" if name in ("rslora", "tied_modules_to_save_embed") else "f16"
    fused, ref = tmp_path / "fused.gguf", tmp_path / "peft.gguf"
    info = _convert(converter, base, fused, outtype, adapter=adapter)
    _convert(converter, peft_dir, ref, outtype)
    assert not _differing(fused, ref)
    # the merge hooked in (that the adapter moves the model is shown by the 16-bit test of the same variant)
    assert info["fused"]["merged"] >= 1 and not info["fused"]["missing"]
    assert info["fused"].get("direct_f16", 0) >= 15 if outtype == "f16" else "direct_f16" not in info["fused"]
    reference = prepare_reference(base, adapter, base, None, gg.end_of_turn_ids(base))
    assert "PEFT" in reference.description
    result = measure(fused, outtype, reference, DEFAULT_FLOORS[outtype])
    assert result.passed and result.kl < 0.001, result


@pytest.fixture(scope="module")
def wrong_adapters(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A trained adapter (LoRA on every projection, lm_head saved whole) and copies doctored the way merge bugs
    go wrong: the lm_head left out (the base's kept), one module dropped, the scale of rsLoRA applied to plain LoRA."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("wrong")
    good = adapters.make_adapter(tiny_models["llama"], root / "good", modules_to_save=["lm_head"], saved_std=0.05)

    def doctored(name: str, keep=lambda key: True, config=None) -> Path:
        out = root / name
        shutil.copytree(good, out)
        tensors = load_file(good / "adapter_model.safetensors")
        save_file({k: v for k, v in tensors.items() if keep(k)}, out / "adapter_model.safetensors")
        cfg = json.loads((good / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
        return out

    return {"good": good,
            "base lm_head": doctored("base-head", lambda k: "lm_head" not in k, {"modules_to_save": None}),
            "dropped module": doctored("dropped", lambda k: "layers.0.self_attn.q_proj" not in k),
            "wrong scale": doctored("scale", config={"use_rslora": True})}


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_parity_gate_fails_a_gguf_with_the_base_lm_head_a_dropped_module_or_a_wrong_scale(converter, tiny_models,
                                                                                         wrong_adapters, tmp_path,
                                                                                         monkeypatch, mode):
    """Each wrong file is what a merge bug writes, made by the real fused conversion from a doctored copy of the
    adapter; the reference is PEFT on the true adapter, so each falls below the f16 floor and the right one passes,
    with the reference held in memory or streamed layer by layer.
    (A reference merged by grpoctl's own merge code passes the base-lm_head file: top-1 99.8%, KL 0.000001.)"""
    monkeypatch.setenv(ENV_REFERENCE, mode)
    base = tiny_models["llama"]
    eot = gg.end_of_turn_ids(base)
    reference = prepare_reference(base, wrong_adapters["good"], base, None, eot)
    results = {}
    for what, adapter in wrong_adapters.items():
        path = tmp_path / f"{what.replace(' ', '-')}.gguf"
        _convert(converter, base, path, "f16", adapter=adapter)
        results[what] = measure(path, "f16", reference, DEFAULT_FLOORS["f16"])
    assert results.pop("good").passed
    floor = DEFAULT_FLOORS["f16"].kl
    assert {what: r.passed for what, r in results.items()} == dict.fromkeys(results, False)
    assert all(r.kl > 1.5 * floor for r in results.values()), {w: r.kl for w, r in results.items()}


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_wrong_merged_folder_fails_the_gate_because_the_reference_is_peft(tiny_models, wrong_adapters, tmp_path,
                                                                            monkeypatch, mode):
    """export_gguf converts an existing merged/ folder instead of merging again, but measures it against PEFT's
    base + adapter, never against that folder: a folder that lost the trained lm_head fails, whether the reference
    is held in memory or streamed layer by layer."""
    monkeypatch.setenv(ENV_REFERENCE, mode)
    base = tiny_models["llama"]
    wrong = peft_merged_folder(base, wrong_adapters["base lm_head"], tmp_path / "merged")
    with pytest.raises(ParityError, match="below the parity floor"):
        gg.export_gguf(base, wrong_adapters["good"], tmp_path / "gguf", ["f16"], name="m",
                       artifacts=Artifacts(root=tmp_path), merged_dir=wrong)
    rep = json.loads((tmp_path / "gguf" / "parity.json").read_text())
    assert "PEFT" in rep["reference"] and not rep["files"]["m-F16.gguf"]["passed"]
    assert ("streamed layer by layer" in rep["reference"]) == (mode == "stream")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_each_architecture_converts_and_runs_in_llama_cpp(converter, tiny_models, tmp_path, arch):
    from transformers import AutoTokenizer

    out = tmp_path / f"{arch}.gguf"
    info = _convert(converter, tiny_models[arch], out, "f16")
    # the fixture's freshly trained tokenizer has a hash llama.cpp does not know; its split rules are Qwen2's
    assert info["pre_tokenizer"] == {"type": "qwen2", "how": "split rules of tokenizer.json"}
    meta, _ = read_gguf(out)
    tok = AutoTokenizer.from_pretrained(tiny_models[arch])
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["general.name"] == "tiny"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    llm = open_gguf(out, 256)
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False,
                                       add_generation_prompt=True)
        # special=True: llama.cpp parses <|im_start|> as one token, exactly as transformers does
        hf_ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf_ids
        assert len(llm.tokenize(text.encode(), add_bos=True, special=False)) > len(tok(text)["input_ids"])
    finally:
        llm.close()


def test_unknown_pretokenizer_fails_clearly_and_override_works(converter, tiny_models, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    data = json.loads((model / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,2}|[^\p{L}\p{N}]+"
    (model / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConversionError) as err:
        _convert(converter, model, tmp_path / "x.gguf")
    assert "GRPOCTL_GGUF_PRE_TOKENIZER" in str(err.value)
    assert not (tmp_path / "x.gguf").exists()
    monkeypatch.setenv("GRPOCTL_GGUF_PRE_TOKENIZER", "llama-bpe")
    info = _convert(converter, model, tmp_path / "x.gguf")
    assert info["pre_tokenizer"]["type"] == "llama-bpe" and "override" in info["pre_tokenizer"]["how"]


def test_unsupported_architecture_is_named_with_the_supported_list(converter, tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError) as err:
        _convert(converter, model, tmp_path / "x.gguf")
    msg = str(err.value)
    assert "FrobnicatorForCausalLM" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_export_all_types_from_one_conversion_with_parity(tiny_models, qwen3_adapter, tmp_path, capsys):
    out = tmp_path / "export" / "gguf"
    manifest = Artifacts(root=tmp_path / "export")
    written = gg.export_gguf(tiny_models["qwen3"], qwen3_adapter, out, ["q8_0", "q4_k_m", "q5_k_m"],
                             name="tiny-qwen3-grpo", artifacts=manifest, system_prompt="Answer with a number.")
    assert [p.name for p in written] == ["tiny-qwen3-grpo-Q8_0.gguf", "tiny-qwen3-grpo-Q4_K_M.gguf",
                                         "tiny-qwen3-grpo-Q5_K_M.gguf"]
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in written] + ["parity.json"])
    file_types = {p.name: read_gguf(p)[0]["general.file_type"] for p in written}
    assert list(file_types.values()) == [7, 15, 17]  # LLAMA_FTYPE_MOSTLY_Q8_0, Q4_K_M, Q5_K_M
    rep = json.loads((out / "parity.json").read_text())
    assert rep["conversion"]["intermediate"] == "bf16"  # one 16-bit pass, the quants made from it
    assert rep["probes"]["positions"] >= 300 and rep["probes"]["kinds"]["chat"] == 3
    assert rep["probes"]["system_prompt"] == "Answer with a number."
    # random weights: the reference is too flat for argmax agreement to mean anything, so only KL is gated
    assert rep["reference_confidence"] < MIN_CONFIDENCE and rep["top1_gated"] is False
    for name, f in rep["files"].items():
        assert f["tokenizer"]["chat_ids_match"] and f["tokenizer"]["template_matches"], name
        assert f["tokenizer"]["bos_count"] == 0  # the template has no BOS, so llama.cpp must add none
        assert f["tokenizer"]["eog"] == {"<|im_end|>": True}
        assert 0 <= f["kl"] < 0.15 and f["passed"]
    assert rep["files"]["tiny-qwen3-grpo-Q8_0.gguf"]["kl"] < rep["files"]["tiny-qwen3-grpo-Q4_K_M.gguf"]["kl"]
    kinds = {f.path: f.kind for f in manifest.files}
    assert kinds["gguf/tiny-qwen3-grpo-Q4_K_M.gguf"] == "gguf:q4_k_m" and kinds["gguf/parity.json"] == "report"
    assert manifest.parity.passed is True
    # the parity phase shows where it is: a bar per transformers pass and per file, with the file count
    shown = capsys.readouterr()
    for bar in ("parity: transformers bfloat16", "parity: transformers float32", "parity: tiny-qwen3-grpo-Q8_0.gguf",
                "parity: tiny-qwen3-grpo-Q5_K_M.gguf"):
        assert bar in shown.err, bar
    assert "tiny-qwen3-grpo-Q4_K_M.gguf in llama.cpp (file 2/3, 9 probes)" in shown.out


def test_gate_fails_and_keeps_no_failing_file(tiny_models, tmp_path):
    out = tmp_path / "gguf"
    manifest = Artifacts(root=tmp_path)
    impossible = {**DEFAULT_FLOORS, "q8_0": Floor(0.0, 0.0)}  # any quantization error is too much
    with pytest.raises(ParityError) as err:
        gg.export_gguf(tiny_models["llama"], None, out, ["bf16", "q8_0"], name="tiny", artifacts=manifest,
                       floors=impossible)
    assert "tiny-Q8_0.gguf" in str(err.value) and "--no-parity-gate" in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["parity.json", "tiny-BF16.gguf"]
    rep = json.loads((out / "parity.json").read_text())
    assert rep["files"]["tiny-Q8_0.gguf"]["passed"] is False and rep["files"]["tiny-BF16.gguf"]["passed"]
    assert not any(p.name.startswith(".gguf-work") for p in out.iterdir())


def test_parity_catches_a_broken_gguf(converter, tiny_models, tmp_path):
    """A file that loads but computes the wrong thing (embedding rows shuffled) must fail its floor."""
    import numpy as np
    from gguf import GGUFReader

    model = tiny_models["qwen2"]
    good = tmp_path / "good.gguf"
    _convert(converter, model, good, "f16")
    broken = tmp_path / "broken.gguf"
    shutil.copy(good, broken)
    reader = GGUFReader(broken, "r+")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = np.array(emb.data)
    emb.data[...] = rows[np.random.default_rng(0).permutation(rows.shape[0])]
    reader.data.flush()
    del reader
    ref = prepare_reference(model, None, model, None, gg.end_of_turn_ids(model))
    ok = measure(good, "f16", ref, DEFAULT_FLOORS["f16"])
    bad = measure(broken, "f16", ref, DEFAULT_FLOORS["f16"])
    assert ok.passed and ok.kl < 0.005
    assert not bad.passed and bad.kl > 0.05


def test_gguf_that_llama_cpp_cannot_load_is_a_conversion_error(converter, tiny_models, tmp_path):
    path = tmp_path / "t.gguf"
    _convert(converter, tiny_models["qwen3"], path, "f16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated, as after a crash or a full disk
    with pytest.raises(ConversionError, match="cannot load"):
        open_gguf(path, 128)


def test_not_enough_disk_is_refused_before_converting(tiny_models, tmp_path, monkeypatch):
    """The real free space is ample here, so the check is given a tiny disk through shutil.disk_usage."""
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(gg.shutil, "disk_usage", lambda _p: usage(10 << 20, 10 << 20, 64 << 10))
    with pytest.raises(DiskFullError, match=r"not enough disk space for GGUF export of q4_k_m in .*: about "
                                            r"\d+\.\d KiB needed, 64\.0 KiB free"):
        gg.export_gguf(tiny_models["qwen3"], None, tmp_path / "gguf", ["q4_k_m"], name="tiny",
                       artifacts=Artifacts(root=tmp_path))
    assert not list((tmp_path / "gguf").glob("*.gguf"))


def test_pretokenizer_table_identifies_known_pipelines(tiny_models, tmp_path):
    from grpoctl.export import pretokenizer

    assert pretokenizer.identify(tiny_models["qwen3"] / "tokenizer.json") == "qwen2"
    data = json.loads((tiny_models["qwen3"] / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = pretokenizer.LLAMA3_REGEX
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert pretokenizer.identify(tmp_path / "tokenizer.json") == "llama-bpe"
    data["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert pretokenizer.identify(tmp_path / "tokenizer.json") is None


def test_end_of_turn_token_other_than_eos_becomes_eot(converter, tiny_models, tmp_path):
    """A base whose EOS is <|endoftext|> while its template ends turns with <|im_end|> (as Qwen2.5 bases)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen2"], model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|endoftext|>"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    im_end, eot = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert gg.end_of_turn_ids(model) == [im_end, eot]
    out = tmp_path / "m.gguf"
    info = _convert(converter, model, out, "f16")
    meta, _ = read_gguf(out)
    assert meta["tokenizer.ggml.eos_token_id"] == eot
    assert meta["tokenizer.ggml.eot_token_id"] == im_end == info["eot_token_id"]
    import llama_cpp

    llm = open_gguf(out, 128)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llama_cpp.llama_vocab_is_eog(vocab, im_end) and llama_cpp.llama_vocab_is_eog(vocab, eot)
    finally:
        llm.close()


def test_parity_floors_are_configurable():
    floors = parse_floors("q4_k_m=0.9:0.1, q8_0=0.97")
    assert floors["q4_k_m"] == Floor(0.9, 0.1) and floors["q8_0"] == Floor(0.97, None)
    assert floors["f16"] == DEFAULT_FLOORS["f16"]
    with pytest.raises(UsageError, match="TYPE=TOP1"):
        parse_floors("q4_k_m:0.9")


def test_export_from_an_already_merged_folder_single_pass(tiny_models, qwen3_adapter, tmp_path):
    """When the merged 16-bit copy exists anyway it is converted (one direct q8_0 pass) and used as reference."""
    merged = peft_merged_folder(tiny_models["qwen3"], qwen3_adapter, tmp_path / "merged")
    manifest = Artifacts(root=tmp_path)
    [path] = gg.export_gguf(tiny_models["qwen3"], qwen3_adapter, tmp_path / "gguf", ["q8_0"], name="m",
                            artifacts=manifest, merged_dir=merged)
    rep = json.loads((tmp_path / "gguf" / "parity.json").read_text())
    assert rep["conversion"]["intermediate"] == "q8_0" and "fused" not in rep["conversion"]
    assert rep["files"][path.name]["passed"] and rep["files"][path.name]["kl"] < 0.02
    assert read_gguf(path)[0]["general.file_type"] == 7


def test_export_fails_when_llama_cpp_cannot_load_the_result(tiny_models, tmp_path):
    """config.json disagrees with the weights (MLP width): the converter writes it, llama.cpp refuses to load."""
    model = tmp_path / "model"
    shutil.copytree(tiny_models["qwen3"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "gguf"
    with pytest.raises(ConversionError, match="cannot load m-Q4_K_M.gguf"):
        gg.export_gguf(model, None, out, ["q4_k_m"], name="m", artifacts=Artifacts(root=tmp_path))
    assert list(out.iterdir()) == []  # nothing under a final name, no work dir left behind
    # nor would transformers be allowed to re-initialise the mismatched weights and serve as the reference
    with pytest.raises(DataError, match="config does not match its weights") as err:
        load_reference(model, None)
    assert err.value.exit_code == 4
