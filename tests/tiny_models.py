"""The tiny random causal LM the causal-LM tests and the benches' smoke runs train: a 2-layer Llama (hidden 32)
with a word-level tokenizer and a ChatML chat template, built in under a second. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LM_WORDS = ("what about tell me the a of is and say please answer topic cats dogs birds fish trees rain sun moon "
            "fur bark wings fins leaves wet hot night day system you are helpful user assistant").split()


def build_tiny_llama(path: Path, bpe: bool = False) -> Path:
    """Save the tiny Llama and its tokenizer as a Hugging Face directory at `path`; its vocabulary is LM_WORDS,
    the numbers 0-59 and the specials, so any other word becomes <unk>. `bpe`: a byte-level BPE tokenizer trained
    here on the same words (~400 tokens, no <unk> needed) instead: what GGUF's `gpt2` tokenizer model holds, so a
    run on it exports to GGUF and loads back. The specials have the same ids either way."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    if bpe:
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = [" ".join(LM_WORDS)] * 4 + [" ".join(str(i) for i in range(60)), "\n: ? . , !"]
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:
        vocab = {tok: i for i, tok in enumerate(specials + sorted(set(LM_WORDS)) + [str(i) for i in range(60)])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="</s>", additional_special_tokens=["<|im_start|>"], model_max_length=256)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=4, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


S2S_WORDS = ("cats dogs birds fish fur bark wings fins have and the a of with in on under over near big small red "
             "blue green old new quick slow happy sad loud quiet none summarize extract").split()


def _word_tokenizer(specials: list[str], template: str, **names):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(S2S_WORDS)) + [str(i) for i in range(40)] + [":"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=names["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **names), vocab


def build_tiny_t5(path: Path) -> Path:
    """A 2-layer T5 (d_model 32) with a word-level tokenizer (pad 0, </s> 1, <unk> 2; EOS after every text)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    fast, vocab = _word_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", unk_token="<unk>", pad_token="<pad>",
                                  eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      relative_attention_num_buckets=8, dropout_rate=0.0)
    T5ForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_bart(path: Path) -> Path:
    """A 2-layer BART (d_model 32) with a word-level tokenizer (<s> 0, <pad> 1, </s> 2, <unk> 3; <s> TEXT </s>)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    fast, vocab = _word_tokenizer(["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", unk_token="<unk>",
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
                        forced_eos_token_id=None, dropout=0.0)
    BartForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    return path
