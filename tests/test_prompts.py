import json
from collections import Counter

import pandas as pd
import pytest

from flipsearch import FlipsearchError, builtin_prompts, load_prompts, split_harmful


def test_shipped_sets_meet_their_sizes():
    prompts = builtin_prompts()
    kinds = Counter(p.kind for p in prompts)
    assert kinds["harmful"] >= 150 and kinds["benign"] >= 100 and kinds["reasoning"] >= 60
    harmful_categories = {p.category for p in prompts if p.kind == "harmful"}
    assert len(harmful_categories) >= 10
    assert all(p.answer for p in prompts if p.kind == "reasoning")
    assert len({p.id for p in prompts}) == len(prompts)


def test_shipped_sets_interleave_categories_so_limit_covers_them():
    harmful = load_prompts("builtin:harmful")
    assert len({p.category for p in harmful[:24]}) >= 10


def test_jsonl_csv_parquet_load_the_same(tmp_path):
    rows = [
        {"id": "a", "kind": "harmful", "category": "x", "prompt": "do harm"},
        {"id": "b", "kind": "reasoning", "category": "math", "prompt": "2+2?", "answer": "4"},
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    csv = tmp_path / "p.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    parquet = tmp_path / "p.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    loaded = [load_prompts(path) for path in (jsonl, csv, parquet)]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0][1].answer == "4"


def test_kind_argument_fills_a_missing_column(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"prompt": "x"}\n{"prompt": "y"}\n')
    prompts = load_prompts(path, kind="harmful")
    assert [p.id for p in prompts] == ["h-1", "h-2"]
    assert {p.category for p in prompts} == {"uncategorised"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "ok", "kind": "harmful"}\n{"prompt": \n', r"p\.jsonl:2: malformed JSON"),
        ('{"kind": "harmful"}\n', r"p\.jsonl:1: missing or empty 'prompt'"),
        ('{"prompt": "x", "kind": "evil"}\n', r"p\.jsonl:1: unknown kind 'evil'"),
        ('{"prompt": "x"}\n', r"p\.jsonl:1: no 'kind' column"),
        (
            '{"id": "a", "prompt": "x", "kind": "benign"}\n'
            '{"id": "a", "prompt": "y", "kind": "benign"}\n',
            r"p\.jsonl:2: duplicate id 'a' \(first on line 1\)",
        ),
        (
            '{"prompt": "x", "kind": "reasoning"}\n',
            r"p\.jsonl:1: reasoning prompt .* has no 'answer'",
        ),
        ("", r"p\.jsonl: the prompt set is empty"),
        ("[1, 2]\n", r"p\.jsonl:1: expected a JSON object"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(FlipsearchError, match=message):
        load_prompts(path)


def test_csv_errors_name_the_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,kind,prompt\na,harmful,fine\nb,harmful,\n")
    with pytest.raises(FlipsearchError, match=r"p\.csv:3: missing or empty 'prompt'"):
        load_prompts(path)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(FlipsearchError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(FlipsearchError, match="unknown built-in"):
        load_prompts("builtin:nope")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(FlipsearchError, match="unsupported prompt file type"):
        load_prompts(tmp_path / "p.txt")


def test_split_is_seeded_stratified_and_disjoint():
    harmful = load_prompts("builtin:harmful")
    search, holdout = split_harmful(harmful, 0.3, seed=1)
    assert {p.id for p in search}.isdisjoint({p.id for p in holdout})
    assert len(search) + len(holdout) == len(harmful)
    assert len(holdout) == round(len(harmful) * 0.3)
    per_category = Counter(p.category for p in holdout)
    assert max(per_category.values()) - min(per_category.values()) <= 1
    again = split_harmful(harmful, 0.3, seed=1)
    assert [p.id for p in again[1]] == [p.id for p in holdout]
    other = split_harmful(harmful, 0.3, seed=2)
    assert [p.id for p in other[1]] != [p.id for p in holdout]


def test_three_splits_are_disjoint_shares_of_every_prompt():
    from flipsearch.prompts import split_three

    for kind in ("harmful", "benign"):
        prompts = load_prompts(f"builtin:{kind}")
        search, selection, final = split_three(prompts, 0.3, 0.2, seed=0)
        ids = [{p.id for p in part} for part in (search, selection, final)]
        assert sum(len(i) for i in ids) == len(prompts) == len(set().union(*ids))
        assert len(final) == round(len(prompts) * 0.2)
        assert abs(len(selection) - len(prompts) * 0.3) <= 1
        assert len({p.category for p in final}) > 1  # stratified, not the file's first rows
    _, _, none = split_three(load_prompts("builtin:harmful"), 0.3, 0.0)
    assert none == []
    with pytest.raises(FlipsearchError, match="must be below 1"):
        split_three(load_prompts("builtin:harmful"), 0.6, 0.4)


def test_split_keeps_its_size_on_small_sets():
    harmful = load_prompts("builtin:harmful")[:24]
    _, holdout = split_harmful(harmful, 0.3, seed=0)
    assert len(holdout) == 7


def test_datasets_name_loads_through_the_datasets_library(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        '{"id": "d1", "kind": "harmful", "category": "x", "prompt": "do harm"}\n'
        '{"id": "d2", "kind": "benign", "category": "y", "prompt": "be nice"}\n'
    )
    prompts = load_prompts(f"hf:{folder}:train")
    assert [(p.id, p.kind) for p in prompts] == [("d1", "harmful"), ("d2", "benign")]
    with pytest.raises(FlipsearchError, match="cannot load dataset"):
        load_prompts(f"hf:{tmp_path / 'missing'}")


def test_limit_takes_a_seeded_stratified_sample_not_the_first_rows():
    from flipsearch.prompts import Prompt, stratified_order, stratified_subset

    grouped = [
        Prompt(f"{c}{i}", "harmful", c, "t") for c in "abcd" for i in range(6)
    ]  # by category
    subset = stratified_subset(grouped, 8, seed=0)
    assert sorted({p.category for p in subset}) == ["a", "b", "c", "d"]
    assert all(sum(p.category == c for p in subset) == 2 for c in "abcd")
    assert [p.id for p in subset] == [p.id for p in grouped if p in subset]  # file order kept
    assert stratified_subset(grouped, 8, seed=0) == subset
    assert stratified_subset(grouped, 8, seed=1) != subset
    shuffled = list(reversed(grouped))
    assert stratified_order(shuffled, 3) == stratified_order(grouped, 3)  # ids decide, not order
    order = stratified_order(grouped, 3)
    assert sorted({p.category for p in order[:4]}) == ["a", "b", "c", "d"]
