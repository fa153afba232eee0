"""Model cards: the front matter parses with huggingface_hub, and every figure equals artifacts.json / the run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from grpoctl.artifacts import Artifacts, find_export
from grpoctl.push.hub import FAMILIES, plan, repo_names
from tests.hubserver import build_export


def _cards(source: Path, repo: str = "alice/tiny", kinds=("merged", "lora", "gguf")) -> dict[str, str]:
    planned = plan(find_export(source), repo_names(repo, list(kinds)), "main")
    return {p.kind: card.decode() for p, card in planned}


def _table_rows(card: str) -> dict[str, list[str]]:
    rows = {}
    files_section = card.split("## Files", 1)[1].split("\n## ", 1)[0]
    for line in files_section.splitlines():
        m = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip().strip("`") for c in m.group(2).split("|")]
    return rows


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return build_export(tmp_path)


def test_card_front_matter_parses_with_huggingface_hub(run_dir):
    cards = _cards(run_dir)
    expect = {
        "merged": ("transformers", "HuggingFaceTB/SmolLM2-135M-Instruct", "finetune"),
        "lora": ("peft", "HuggingFaceTB/SmolLM2-135M-Instruct", "adapter"),
        "gguf": ("gguf", "alice/tiny", "quantized"),
    }
    for kind, text in cards.items():
        data = ModelCard(text).data.to_dict()
        library, base, relation = expect[kind]
        assert data["library_name"] == library
        assert data["base_model"] == base and data["base_model_relation"] == relation
        assert data["license"] == "apache-2.0"
        assert data["pipeline_tag"] == "text-generation"
        assert data["datasets"] == ["openai/gsm8k"]
        assert "grpo" in data["tags"]
        assert ("gguf" in data["tags"]) == (kind == "gguf")


def test_card_file_table_matches_artifacts_json(run_dir):
    manifest = Artifacts.load(run_dir / "export")
    cards = _cards(run_dir)
    for kind, text in cards.items():
        prefix = FAMILIES[kind][1]
        rows = _table_rows(text)
        entries = [f for f in manifest.files if f.path.startswith(prefix)]
        assert set(rows) == {f.path[len(prefix):] for f in entries}
        for f in entries:
            cells = rows[f.path[len(prefix):]]
            assert str(f.size) in cells and f.sha256 in cells
    gguf_rows = _table_rows(cards["gguf"])
    for name, quant in (("Tiny-Q4_K_M.gguf", "Q4_K_M"), ("Tiny-Q8_0.gguf", "Q8_0")):
        cells = gguf_rows[name]
        assert cells[0] == quant
        rec = manifest.parity.files[name]
        assert f"top-1 {rec.top1 * 100:.1f}%" in cells[-1] and f"mean KL {rec.kl:.4g}" in cells[-1]


def test_card_recipe_comes_from_the_run(run_dir):
    text = _cards(run_dir)["lora"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"- Steps: {summary['steps']}" in text
    assert f"- Final mean reward at the last logged step: {summary['mean_reward_last']}" in text
    assert "`correctness` (weight 2)" in text and "`language_consistency` (weight 1)" in text
    assert "| `r` | 16 |" in text and "| `lora_alpha` | 32 |" in text
    assert "| `learning_rate` | 5e-06 |" in text
    assert "- System prompt used in training: `Think, then answer.`" in text


def test_card_commands_name_the_repo_and_snippets_compile(run_dir):
    cards = _cards(run_dir)
    assert "ollama run hf.co/alice/tiny-GGUF:Q4_K_M" in cards["gguf"]
    assert "llama-server -hf alice/tiny-GGUF:Q4_K_M" in cards["gguf"]
    assert "vllm serve alice/tiny\n" in cards["merged"]
    assert ("vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora --lora-modules grpo=alice/tiny-lora "
            "--max-lora-rank 16") in cards["lora"]
    for text in cards.values():
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
            compile(block, "<card>", "exec")


def test_card_without_run_records_no_invented_recipe(tmp_path):
    export = build_export(tmp_path, with_run=False)
    cards = _cards(export, kinds=("gguf",))
    text = cards["gguf"]
    assert "recipe is not recorded" in text
    assert "Final mean reward" not in text and "Steps:" not in text
    data = ModelCard(text).data.to_dict()
    # GGUF alone: it derives from the base model (from artifacts.json provenance), not from an unpublished repo
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["base_model_relation"] == "finetune"
    assert "datasets" not in data


def test_card_is_deterministic_so_repushes_stay_idempotent(run_dir):
    assert _cards(run_dir) == _cards(run_dir)


def test_every_card_shows_the_reward_curve_pushed_beside_it(run_dir):
    import xml.etree.ElementTree as ET

    planned = plan(find_export(run_dir), repo_names("alice/tiny", ["merged", "lora", "gguf"]), "main")
    for push_, card in planned:
        assert "![Mean reward per training step](reward.svg)" in card.decode()
        (plot,) = [f for f in push_.files if f.path_in_repo == "reward.svg"]
        svg = ET.fromstring(plot.data)  # an SVG image: the logged rewards 0.25 and 0.8125, one marker a step
        assert len(list(svg.iter("{http://www.w3.org/2000/svg}circle"))) == 2
        assert plot.size == len(plot.data)


def test_a_run_without_logged_steps_gets_no_reward_curve(run_dir):
    (run_dir / "metrics.jsonl").unlink()
    for push_, card in plan(find_export(run_dir), repo_names("alice/tiny", ["lora"]), "main"):
        assert "reward.svg" not in card.decode() and "reward.svg" not in {f.path_in_repo for f in push_.files}


def test_card_for_4bit_weights(run_dir):
    export = run_dir / "export"
    (export / "merged-4bit").mkdir()
    (export / "merged-4bit/model.safetensors").write_bytes(b"\0" * 4096)
    (export / "merged-4bit/config.json").write_text('{"quantization_config": {"load_in_4bit": true}}\n')
    m = Artifacts.load(export)
    m.add_tree(export / "merged-4bit", "merged-4bit")
    m.save()
    cards = _cards(run_dir, kinds=("merged", "merged-4bit"))
    data = ModelCard(cards["merged-4bit"]).data.to_dict()
    assert data["base_model"] == "alice/tiny" and data["base_model_relation"] == "quantized"
    assert "bitsandbytes" in data["tags"] and data["library_name"] == "transformers"
    assert "vllm serve alice/tiny-bnb-4bit --quantization bitsandbytes" in cards["merged-4bit"]
    assert set(_table_rows(cards["merged-4bit"])) == {"model.safetensors", "config.json"}


def test_card_reads_final_reward_from_metrics_when_summary_lacks_it(run_dir):
    (run_dir / "summary.json").write_text(json.dumps({"wall_time_s": 12.5}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward": r}) + "\n"
                                                   for i, r in ((1, 0.1), (2, 0.3), (3, 0.55))))
    text = _cards(run_dir, kinds=("lora",))["lora"]
    assert "- Final mean reward at the last logged step: 0.55 (first steps: 0.1)" in text
    assert "- Steps: 3" in text


# --- cards of an export the export stage wrote ----------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(qwen3_run, tmp_path_factory) -> Path:
    """An export written by `grpoctl export` itself (the adapter alone and a GGUF with its parity record), so
    these cards read exactly what the stages write."""
    from click.testing import CliRunner

    from grpoctl.cli import cli

    out = tmp_path_factory.mktemp("exported") / "export"
    res = CliRunner().invoke(cli, ["export", str(qwen3_run), "-o", str(out), "--lora", "--gguf", "q8_0",
                                   "--no-manifests", "-q"])
    assert res.exit_code == 0, res.output
    return out


def test_card_of_a_real_export_reports_what_verification_found_not_where_it_ran(exported, qwen3_run):
    verify = json.loads((exported / "verify.json").read_text())
    for kind, text in _cards(exported, kinds=("lora", "gguf")).items():
        table = text.split("## Adapter verification", 1)[1].split("\n## ", 1)[0]
        assert str(qwen3_run / "adapter") not in text, kind  # a path on the exporting machine means nothing here
        assert re.search(rf"\| [^|]*modules[^|]* \| {verify['summary']['modules']} \|", table), table
        assert re.search(r"\| [^|]*untrained[^|]* \| 0 \|", table), table


def test_card_of_a_real_export_shows_each_gguf_parity_as_parity_json_records_it(exported):
    rec = json.loads((exported / "gguf" / "parity.json").read_text())
    text = _cards(exported, kinds=("gguf",))["gguf"]
    (name,) = rec["files"]
    row = _table_rows(text)[name]
    f = rec["files"][name]
    assert f"{f['top1'] * 100:.1f}%" in row[-1] and f"{f['kl']:.4g}" in row[-1]
    assert "Parity vs. PEFT reference |" in text
    assert "against the PEFT reference (base + adapter applied by PEFT" in text
    assert "against the merged model in transformers" not in text
    assert f"{rec['noise_floor']['top1'] * 100:.1f}%" in text
