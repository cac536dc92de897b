"""Randomly initialised tiny models of every supported family, and offline tokenizers, for tests."""

from __future__ import annotations

import functools

import torch
import transformers as T
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of France is Paris and the capital of Italy is Rome.",
    "Beats Music is owned by Apple. Microsoft was founded by Bill Gates.",
    "Michael Jordan plays basketball. Jimi Hendrix played the guitar.",
    "The Colosseum is in Rome. Big Ben is in London. The Louvre is in Paris.",
    "The official language of Brazil is Portuguese. The currency of Japan is the yen.",
    "Tower Bridge Music Apple city located capital language currency founded owned",
] * 3


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str = "bytelevel") -> T.PreTrainedTokenizerFast:
    """`bytelevel`: GPT-2 style ("Ġ" spaces, no BOS). `metaspace`: SentencePiece style ("▁", adds <s>)."""
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    if kind == "bytelevel":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        wrapped = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                            unk_token="<unk>")
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special)
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        wrapped = T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                            eos_token="</s>", unk_token="<unk>")
    return wrapped


V = 320
SMALL = dict(num_hidden_layers=4, num_attention_heads=4, hidden_size=32, intermediate_size=64, vocab_size=V,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(SMALL, num_key_value_heads=2)

CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=4, n_head=4, n_embd=32, vocab_size=V, n_positions=128, bos_token_id=1,
                                 eos_token_id=2),
    "gptj": lambda: T.GPTJConfig(n_layer=4, n_head=4, n_embd=32, vocab_size=V, n_positions=128, rotary_dim=4,
                                 bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(**SMALL, rotary_pct=0.5),
    "gpt_neox_serial": lambda: T.GPTNeoXConfig(**SMALL, use_parallel_residual=False),
    "llama": lambda: T.LlamaConfig(**GQA),
    "mistral": lambda: T.MistralConfig(**GQA, sliding_window=64),
    "qwen2": lambda: T.Qwen2Config(**GQA),
    "qwen3": lambda: T.Qwen3Config(**GQA, head_dim=8),
    "gemma": lambda: T.GemmaConfig(**GQA, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**GQA, head_dim=8, sliding_window=64),
    "gemma3": lambda: T.Gemma3TextConfig(**GQA, head_dim=8, sliding_window=64),
    "phi3": lambda: T.Phi3Config(**GQA),
    "olmo": lambda: T.OlmoConfig(**SMALL),
    "olmo2": lambda: T.Olmo2Config(**GQA),
    "phi": lambda: T.PhiConfig(**SMALL),
    "starcoder2": lambda: T.Starcoder2Config(**GQA),
    "smollm3": lambda: T.SmolLM3Config(**GQA),
}
FAMILIES = sorted(CONFIGS)


def model(family: str, seed: int = 0, attn: str | None = None) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    kwargs = {"attn_implementation": attn} if attn else {}
    m = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    # random init is small; scale weights up so interventions have visible effects
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    return m.eval()


def save(path, family: str, tokenizer_kind: str = "bytelevel"):
    """A tiny model and tokenizer written as a Hugging Face directory at `path` (what the CLI tests load)."""
    model(family).save_pretrained(path)
    tokenizer(tokenizer_kind).save_pretrained(path)
    return path


def lm(family: str, tokenizer_kind: str = "bytelevel", seed: int = 0, attn: str | None = None):
    import locedit

    loaded = locedit.load((model(family, seed, attn), tokenizer(tokenizer_kind)))
    loaded._family = family  # lets tests rebuild the same model
    return loaded


def reference_knockout(family: str, input_ids, blocks) -> torch.Tensor:
    """Independent slow reference for attention knockout: the eager model, with each attention module's mask
    kwarg replaced by an explicit additive mask (causal, plus that layer's blocked (query, key) edges).
    `blocks` = [(layers, queries, keys)]. Returns the last position's logits."""
    import locedit

    model_ = model(family, attn="eager")
    adapter = locedit.core.adapters.adapter_for(model_)
    n = len(input_ids)
    handles = []
    for layer, block in enumerate(adapter.get_layers(model_)):
        mask = torch.zeros(1, 1, n, n)
        mask.masked_fill_(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
        for layers, queries, keys in blocks:
            if layer in layers:
                for q in queries:
                    for k in keys:
                        mask[0, 0, q % n, k % n] = torch.finfo(torch.float32).min

        def pre(module, args, kwargs, mask=mask):
            return args, {**kwargs, "attention_mask": mask}

        handles.append(locedit.core.adapters._get(block, adapter.attn).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return model_(input_ids=torch.tensor([list(input_ids)])).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
