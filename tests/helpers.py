"""Small objects built in code for tests: a word-level chat tokenizer."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def chat_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.WhitespaceSplit()])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    out.chat_template = CHAT_TEMPLATE
    return out
