"""The general-tools peer of ``pldr bench decode``: a Hugging Face ``LlamaForCausalLM`` of the preset's
shape (random weights), decoding greedily through transformers' own ``generate`` and ``StaticCache``.

Compiling is transformers' own: with a static cache on CUDA, ``generate`` compiles the model's decode
forward with ``torch.compile`` (mode reduce-overhead, CUDA graph trees; asked here for one full graph);
the prefill runs eagerly, as in our engine. transformers is optional: without it the peer is skipped.
"""

from __future__ import annotations

import inspect

import torch

from pldr_core.config import PLDRConfig

PEER_NAME = "hf-llama-static"


def load_transformers():
    """The transformers module, or None where it cannot be imported."""
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def llama_config(transformers, config: PLDRConfig, max_len: int):
    """A Llama config of ``config``'s shape: width, layers, heads (no grouped keys), FFN width (SwiGLU
    like ours), vocabulary; untied head, no biases. No EOS id: like our engine's timed loop, it never
    stops early nor masks EOS, so both decode exactly the tokens asked for."""
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.dff,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, head_dim=config.head_dim,
        max_position_embeddings=max(max_len, config.max_seq_len), tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, pad_token_id=None, bos_token_id=config.bos_id,
        eos_token_id=None)


class HFPeer:
    """One batch size's peer: ``generate(prompt, new_tokens)`` like ``DecodeEngine.generate``.

    One ``StaticCache`` serves every run (reset before each, inside the timing as our engine resets
    its caches in ``prefill``): ``generate`` would otherwise allocate a new one per call, and the
    compiled step's CUDA graphs would be recorded again for the new cache addresses."""

    def __init__(self, config: PLDRConfig, dev: torch.device, dtype: torch.dtype, *, max_len: int,
                 compile: bool, seed: int = 0):
        transformers = load_transformers()
        if transformers is None:
            raise RuntimeError("transformers is not installed")  # callers check first
        self.version = transformers.__version__
        hf_config = llama_config(transformers, config, max_len)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.LlamaForCausalLM(hf_config)
        self.model = model.to(device=dev, dtype=dtype).eval()
        self.cache = transformers.StaticCache(config=hf_config, max_cache_len=max_len)
        # transformers 5 renamed generate's past_key_values to cache (the old name still works, warning).
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters \
            else "past_key_values"
        self._kw = dict(do_sample=False, num_beams=1, disable_compile=not compile)
        if compile:
            self._kw["compile_config"] = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
        self.params = sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The new tokens [B, new_tokens], prefill included."""
        self.cache.reset()
        B, S = prompt.shape
        out = self.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, **{self._cache_kw: self.cache}, **self._kw)
        if out.shape != (B, S + new_tokens):  # a short run would overstate tokens/s
            raise RuntimeError(f"the peer returned {tuple(out.shape)} tokens, expected {(B, S + new_tokens)}")
        return out[:, S:]
