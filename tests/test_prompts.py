"""Prompts: files read, texts tokenized and checked, batches formed deterministically."""

import json

import pytest
import torch

from layerwise.errors import UserError
from layerwise.prompts import Prompt, make_batches, read_prompt_file, tokenize


def test_text_file_one_prompt_per_non_empty_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("The capital of France is\n\n  Hi  \n")
    assert read_prompt_file(str(path)) == ["The capital of France is", "  Hi  "]


def test_jsonl_file_with_texts_and_token_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "abc"}) + "\n" + json.dumps({"token_ids": [1, 2, 3]}) + "\n")
    assert read_prompt_file(str(path)) == ["abc", [1, 2, 3]]


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"), ("", "holds no prompt"), ('{"text": "a"}\n{oops', "line 2 is not valid JSON"),
    ('{"token_ids": [1, -2]}', 'token id 1 is -2, not a non-negative integer'),
    ('{"other": 1}', "line 1 must be"),
])
def test_bad_prompt_files(tmp_path, content, fragment):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        read_prompt_file(str(path))


class ByteTokenizer:
    chat_template = None

    def __call__(self, text):
        return {"input_ids": list(text.encode())}


def test_tokenize_texts_and_ids():
    prompts = tokenize(["ab", [7, 8, 9]], ByteTokenizer())
    assert prompts == [Prompt(0, "ab", (97, 98)), Prompt(1, None, (7, 8, 9))]
    assert tokenize([[5]], None) == [Prompt(0, None, (5,))]


@pytest.mark.parametrize("items, kwargs, fragment", [
    ([], {}, "no prompt given"),
    (["  "], {}, "prompt 0 is empty"),
    (["abc"], {"tokenizer": None}, "has no tokenizer"),
    (["abc"], {"chat_template": True}, "the tokenizer has no chat template"),
    (["abcd"], {"max_tokens": 3}, "more than --max-tokens 3"),
    (["abcd"], {"context_length": 2}, "more than the model's context of 2"),
    ([[1, 600]], {"vocab_size": 512}, "token id 600, outside the vocabulary of 512"),
])
def test_tokenize_refuses(items, kwargs, fragment):
    tokenizer = kwargs.pop("tokenizer", ByteTokenizer())
    with pytest.raises(UserError, match=fragment):
        tokenize(items, tokenizer, **kwargs)


def test_batches_longest_first_right_padded():
    prompts = [Prompt(0, None, (1,)), Prompt(1, None, (1, 2, 3)), Prompt(2, None, (4, 5)), Prompt(3, None, (6, 7, 8))]
    batches = make_batches(prompts, 2, pad_id=0)
    assert [[p.index for p in b.prompts] for b in batches] == [[1, 3], [2, 0]]
    assert torch.equal(batches[1].input_ids, torch.tensor([[4, 5], [1, 0]]))
    assert torch.equal(batches[1].attention_mask, torch.tensor([[1, 1], [1, 0]]))
    assert batches[1].lengths == [2, 1]
    again = make_batches(list(reversed(prompts)), 2, pad_id=0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again)), "order of input is irrelevant"
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        make_batches(prompts, 0, 0)


def test_batches_hold_every_id_exactly_as_int64():
    """Ids past 32 bits and a prompt of none (make_batches called directly) land as given, padded
    with the pad id, in int64 (the rows go through an int64 array, not torch.tensor of a tuple)."""
    ids = (2**40 + 7, 0, 151642, 2**31, 5)
    [batch] = make_batches([Prompt(0, None, ids), Prompt(1, None, ()), Prompt(2, None, (9,))], 3, pad_id=3)
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    assert batch.input_ids.tolist() == [list(ids), [9, 3, 3, 3, 3], [3] * 5]
    assert batch.attention_mask.tolist() == [[1] * 5, [1, 0, 0, 0, 0], [0] * 5]
