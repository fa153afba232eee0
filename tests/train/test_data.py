"""Data preparation on the shipped set with real tokenizers: mapping, markers, length quantile, errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from grpoctl.config import DataConfig
from grpoctl.errors import DataError, InputNotFoundError
from grpoctl.train.data import extract_hash_answer, find_reasoning_markers, load_source, prepare


def test_shipped_dataset_loads_and_extracts_hash_answers():
    ds = load_source(None)
    assert {"question", "answer"} <= set(ds.column_names) and len(ds) == 400
    assert extract_hash_answer("31 - 8 = 23\n#### 23") == "23"
    assert extract_hash_answer("no marker") is None


def test_prepare_drops_the_longest_decile_and_derives_lengths(tiny_qwen3):
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    p = prepare(load_source(None), tok, DataConfig(), max_seq_length=1024)
    assert p.rows_total == 400 and p.rows_kept < 400 and p.rows_kept >= 0.85 * 400
    assert p.max_prompt_length == p.length_cutoff + 1
    assert p.max_completion_length == 1024 - p.max_prompt_length
    row = p.dataset[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert "Indonesian" in row["prompt"][0]["content"]
    assert row["answer"].lstrip("-").isdigit()
    capped = prepare(load_source(None), tok, DataConfig(), 1024, max_completion_length=16)
    assert capped.max_completion_length == 16


def test_markers_come_from_the_tokenizer_or_the_config(tiny_qwen3, smollm2_dir):
    m = find_reasoning_markers(AutoTokenizer.from_pretrained(tiny_qwen3), "<r>", "</r>")
    assert (m.start, m.end, m.source, m.prefilled_start) == ("<think>", "</think>", "tokenizer", True)
    m = find_reasoning_markers(AutoTokenizer.from_pretrained(smollm2_dir), "<start_working_out>", "<end_working_out>")
    assert (m.start, m.end, m.source, m.prefilled_start) == ("<start_working_out>", "<end_working_out>", "config",
                                                           False)


def test_local_csv_and_field_mapping(tmp_path, tiny_qwen3):
    f = tmp_path / "q.csv"
    f.write_text("problem,solution,final\nWhat is 2+2?,2+2=4,4\nWhat is 3+3?,3+3=6,6\n")
    cfg = DataConfig(prompt_field="problem", solution_field="solution", answer_field="final",
                     extract_hash_answer=False, system_prompt="")
    p = prepare(load_source(str(f)), AutoTokenizer.from_pretrained(tiny_qwen3), cfg, 256, max_prompt_length=200)
    assert p.rows_kept == 2 and p.dataset["answer"] == ["4", "6"]
    assert [m["role"] for m in p.dataset[0]["prompt"]] == ["user"]


def test_missing_columns_is_a_data_error(tmp_path, tiny_qwen3):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "x", "solution": "y"}) + "\n")
    with pytest.raises(DataError, match=r"no column 'question'.*columns: prompt, solution"):
        prepare(load_source(str(f)), AutoTokenizer.from_pretrained(tiny_qwen3), DataConfig(), 1024)


def test_all_prompts_too_long_is_a_data_error(tiny_qwen3):
    with pytest.raises(DataError, match="every prompt is longer than the limit"):
        prepare(load_source(None), AutoTokenizer.from_pretrained(tiny_qwen3), DataConfig(), max_seq_length=40)


def test_missing_file_and_offline_hub_name(monkeypatch):
    with pytest.raises(InputNotFoundError):
        load_source("./nope/data.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from grpoctl.errors import OfflineError

    with pytest.raises(OfflineError, match="Hub seems unreachable|cannot be reached"):
        load_source("openai/gsm8k", "main")


def test_answer_column_alone_needs_no_solution_column(tmp_path, tiny_qwen3):
    """`--answer-field final` on a file without the default solution column `answer` maps (no `answer` column
    is required); the answer stands in as the solution rewards receive."""
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"problem": f"{a}+{a}?", "final": 2 * a}) + "\n" for a in (1, 2)))
    cfg = DataConfig(prompt_field="problem", answer_field="final")
    p = prepare(load_source(str(f)), AutoTokenizer.from_pretrained(tiny_qwen3), cfg, 256, max_prompt_length=200)
    assert p.dataset["answer"] == ["2", "4"] and p.dataset["solution"] == ["2", "4"]
    # a solution column the user named explicitly is still required
    with pytest.raises(DataError, match="no column 'work'"):
        prepare(load_source(str(f)), AutoTokenizer.from_pretrained(tiny_qwen3),
                DataConfig(prompt_field="problem", answer_field="final", solution_field="work"), 256)


@pytest.mark.parametrize(("spec", "local"), [("data/problems", None), ("data/problem.jsonl", True), ("./x", True),
                                             ("~/x", True), ("a/b/c", True), ("x.jsonl", True), ("org/set.csv", True),
                                             ("openai/gsm8k", False), ("gsm8k", False), ("org/name.v2", False)])
def test_what_looks_like_a_local_path(spec, local, tmp_path, monkeypatch):
    from grpoctl.train.data import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    if local is None:  # one slash, like owner/name: local only when its first folder exists here
        assert not looks_like_local_path(spec)
        (tmp_path / "data").mkdir()
        local = True
    assert looks_like_local_path(spec) is local


def test_held_out_prompts_are_a_fixed_tenth_at_most_and_never_trained_on(tiny_qwen3, tmp_path):
    from grpoctl.train.data import hold_out, write_held_out

    p = prepare(load_source(None), AutoTokenizer.from_pretrained(tiny_qwen3), DataConfig(), max_seq_length=1024)
    train, held = hold_out(p.dataset, DataConfig().held_out)
    assert len(held) == 16 and len(train) + len(held) == p.rows_kept
    questions = {r["prompt"][-1]["content"] for r in held}
    assert not questions & {r["prompt"][-1]["content"] for r in train}
    again, _ = hold_out(p.dataset, 16)  # a resumed run holds out the same prompts
    assert again["answer"] == train["answer"]
    few, none = hold_out(p.dataset.select(range(9)), 16)  # never more than a tenth: 9 rows keep all 9
    assert len(few) == 9 and len(none) == 0
    write_held_out(held, tmp_path / "held_out.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "held_out.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in rows] == held["answer"] and rows[0]["prompt"][0]["role"] == "system"
