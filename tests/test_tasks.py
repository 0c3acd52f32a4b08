"""Tasks as data: prompts match lm-eval-harness's rendering, splits are deterministic, bad data is named."""

import json

import pytest

from muscle import MuscleError
from muscle.data import IGNORE_INDEX, encode_example, next_token_labels, split_context_answer
from muscle.tasks import (
    fewshot_prefix,
    get_task,
    hellaswag_preprocess,
    load_examples,
    split_indices,
)
from tiny import EMBEDDED_DATA, FIXTURE_DATA, build_tokenizer

# ---------------------------------------------------------------- rendering (hand-written expectations)
# The expected strings below are written by hand from lm-eval-harness's task definitions:
#   piqa.yaml:      doc_to_text "Question: {{goal}}\nAnswer:", choices [sol1, sol2], delimiter " "
#   hellaswag:      query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
#   gsm8k.yaml:     doc_to_text "Question: {{question}}\nAnswer:", target {{answer}}
# and the paper's App. A.1 for SAMSum ("Dialogue:" / "Summary:").


def test_piqa_prompt_first_validation_example():
    ex = load_examples("piqa", "test", data_dir=EMBEDDED_DATA, max_examples=1)[0]
    first = json.loads((EMBEDDED_DATA / "piqa" / "valid.jsonl").read_text().splitlines()[0])
    assert ex.context == "Question: " + first["goal"] + "\nAnswer:"
    assert ex.choices == (first["sol1"], first["sol2"])
    assert ex.target == first["label"]
    assert get_task("piqa").target_delimiter == " "


def test_piqa_fixed_record():
    rec = {
        "goal": "How do I open a jar?",
        "sol1": "Twist the lid.",
        "sol2": "Eat the lid.",
        "label": 0,
    }
    ex = get_task("piqa").to_example(rec, 7)
    assert ex.context == "Question: How do I open a jar?\nAnswer:"
    assert ex.answer == "Twist the lid."
    assert ex.id == 7


def test_hellaswag_hub_record_matches_lm_eval():
    rec = {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "starts pulling up roofing on a roof.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
        ],
        "label": "3",
    }
    ex = get_task("hellaswag").to_example(rec, 0)
    assert ex.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert ex.choices[1] == "starts pulling up roofing on a roof."
    assert ex.target == 3


def test_hellaswag_preprocess_markers():
    # strip first, then markers out: lm-eval keeps the space that followed a leading marker.
    assert (
        hellaswag_preprocess(" [header] How to x [title] Do y. [step] Now  z")
        == " How to x. Do y. Now z"
    )


def test_hellaswag_local_carve_out_is_disjoint():
    train = load_examples("hellaswag", "train", data_dir=FIXTURE_DATA, max_examples=300)
    test = load_examples("hellaswag", "test", data_dir=FIXTURE_DATA, max_examples=300)
    assert all(ex.id % 4 == 0 for ex in test)
    assert all(ex.id % 4 != 0 for ex in train)
    assert test[0].context.startswith("Roof shingle removal: ")


def test_gsm8k_prompt_and_fewshot():
    ex = get_task("gsm8k").to_example({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}, 0)
    assert ex.context == "Question: What is 2+2?\nAnswer:"
    assert ex.target == "4"
    shots = [get_task("gsm8k").to_example({"question": "1+1?", "answer": "#### 2"}, 1)]
    assert fewshot_prefix(get_task("gsm8k"), shots) == "Question: 1+1?\nAnswer: #### 2\n\n"


def test_samsum_prompt():
    ex = get_task("samsum").to_example(
        {"id": "13", "dialogue": "A: hi\r\nB: yo", "summary": "They greet."}, 0
    )
    assert ex.context == "Dialogue: A: hi\nB: yo\nSummary:"
    assert ex.answer == "They greet."
    assert get_task("samsum").no_repeat_ngram_size == 2
    assert "\n\n" in get_task("samsum").stop_strings


# ---------------------------------------------------------------- splits


def test_split_is_80_20_disjoint_and_deterministic():
    tr, va = split_indices(1000, 0.2, seed=3)
    assert len(va) == 200 and len(tr) == 800
    assert set(tr).isdisjoint(va) and set(tr) | set(va) == set(range(1000))
    tr2, va2 = split_indices(1000, 0.2, seed=3)
    assert (tr == tr2).all() and (va == va2).all()
    _, va3 = split_indices(1000, 0.2, seed=4)
    assert set(va3) != set(va)


def test_load_examples_splits_deterministic():
    a = load_examples("piqa", "validation", data_dir=EMBEDDED_DATA, max_examples=500, split_seed=1)
    b = load_examples("piqa", "validation", data_dir=EMBEDDED_DATA, max_examples=500, split_seed=1)
    t = load_examples("piqa", "train", data_dir=EMBEDDED_DATA, max_examples=500, split_seed=1)
    assert [e.id for e in a] == [e.id for e in b]
    assert len(a) == 100 and len(t) == 400
    assert {e.id for e in a}.isdisjoint(e.id for e in t)


# ---------------------------------------------------------------- tokenization


def test_context_answer_split_and_labels():
    tok = build_tokenizer()
    ctx, cont = split_context_answer(tok, "Question: x\nAnswer:", " Twist the lid.")
    whole = tok("Question: x\nAnswer: Twist the lid.")["input_ids"]
    assert ctx + cont == whole
    assert ctx[0] == tok.bos_token_id
    assert tok.decode(cont) == " Twist the lid."


def test_next_token_labels_by_hand():
    assert next_token_labels([5, 6, 7, 8], [False, False, True, True]) == [
        IGNORE_INDEX,
        7,
        8,
        IGNORE_INDEX,
    ]
    assert next_token_labels([5, 6], [True, True]) == [6, IGNORE_INDEX]


def test_encode_answer_only_and_eos():
    tok = build_tokenizer()
    task = get_task("gsm8k")
    ex = task.to_example({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}, 0)
    full = encode_example(tok, task, ex)
    ans = encode_example(tok, task, ex, answer_only=True)
    assert full.input_ids == ans.input_ids
    assert full.input_ids[-1] == tok.eos_token_id  # generation tasks learn to stop
    n_targets_full = sum(lab != IGNORE_INDEX for lab in full.labels)
    n_targets_ans = sum(lab != IGNORE_INDEX for lab in ans.labels)
    assert n_targets_full == len(full.input_ids) - 1  # every next token
    assert n_targets_ans == len(full.input_ids) - full.n_context


def test_truncation_left_keeps_answer_and_bos():
    tok = build_tokenizer()
    task = get_task("piqa")
    ex = task.to_example(
        {"goal": "word " * 80, "sol1": "Twist the lid.", "sol2": "b", "label": 0}, 0
    )
    enc = encode_example(tok, task, ex, max_length=30)
    assert len(enc.input_ids) == 30 and enc.truncated > 0
    assert enc.input_ids[0] == tok.bos_token_id
    assert tok.decode(enc.input_ids[enc.n_context :]) == " Twist the lid."
    with pytest.raises(MuscleError, match="max_length"):
        encode_example(tok, task, ex, max_length=30, truncation="refuse")


# ---------------------------------------------------------------- bad data


def test_unknown_task():
    with pytest.raises(MuscleError, match="unknown task 'nope'.*piqa"):
        get_task("nope")


def test_missing_file_invalid_json_missing_field(tmp_path):
    with pytest.raises(MuscleError, match="data file not found"):
        load_examples("piqa", "train", data_dir=tmp_path)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "train.jsonl").write_text(
        '{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{oops\n'
    )
    with pytest.raises(MuscleError, match=r"train.jsonl:2: not valid JSON"):
        load_examples("piqa", "train", data_dir=tmp_path)
    (tmp_path / "piqa" / "train.jsonl").write_text('{"goal": "a", "sol1": "b", "label": 0}\n')
    with pytest.raises(MuscleError, match=r"train.jsonl:1: missing field\(s\) sol2"):
        load_examples("piqa", "train", data_dir=tmp_path)
    # HellaSwag's local split needs idx (the test carve-out is idx % 4 == 0): a record without
    # it is a one-line error, not a KeyError traceback.
    (tmp_path / "hellaswag").mkdir()
    rec = {"activity_label": "a", "ctx": "b", "endings": ["c", "d"], "label": 0}
    (tmp_path / "hellaswag" / "validation.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(MuscleError, match=r"validation.jsonl:1: missing field\(s\) idx"):
        load_examples("hellaswag", "test", data_dir=tmp_path)


def test_empty_dataset(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text("\n")
    with pytest.raises(MuscleError, match="no examples"):
        load_examples("piqa", "test", data_dir=tmp_path)
