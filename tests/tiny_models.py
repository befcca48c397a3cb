"""The tiny random causal LM the causal-LM tests and the benches' smoke runs train: a 2-layer Llama (hidden 32)
with a word-level tokenizer and a ChatML chat template, built in under a second. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LM_WORDS = ("what about tell me the a of is and say please answer topic cats dogs birds fish trees rain sun moon "
            "fur bark wings fins leaves wet hot night day system you are helpful user assistant").split()


def build_tiny_llama(path: Path) -> Path:
    """Save the tiny Llama and its tokenizer as a Hugging Face directory at `path`; its vocabulary is LM_WORDS,
    the numbers 0-59 and the specials, so any other word becomes <unk>."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(LM_WORDS)) + [str(i) for i in range(60)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="</s>", additional_special_tokens=["<|im_start|>"], model_max_length=256)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=4, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path
