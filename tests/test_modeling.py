"""Tests of altgrad.modeling: the nanoGPT architecture as a transformers 5.x model.

Every model here is tiny (a few thousand parameters) so the file runs in well under a minute on
two CPU cores; the one subprocess (remote-code loading without altgrad) dominates.
"""

import json
import logging
import math
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from altgrad.modeling import GPT, GPTConfig, GPTForCausalLM, build_char_tokenizer
from altgrad.modeling.convert_nanogpt import convert_nanogpt_checkpoint, main as convert_main
from altgrad.modeling.model_card import count_parameters, write_model_card
from altgrad.modeling.modeling_gpt import Block

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare/input.txt")

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, as forward argument and as output field;
# earlier 5.x releases only know the old name. On 5.24 the old name still works but logs a deprecation warning.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ----------------------------------------------------------------------------- fixtures


def tiny_config(**overrides) -> GPTConfig:
    kwargs = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=11, dropout=0.0, bias=True)
    kwargs.update(overrides)
    return GPTConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def lively_model(seed: int = 0, **overrides) -> GPT:
    """A tiny eval-mode float64 model whose greedy continuation depends on the whole context.

    With GPT-2's init (std 0.02) and tied embeddings a tiny model just repeats its last token, whatever
    came before and at whatever position: a KV cache that forgets the past, or positions that restart
    at 0, would go unnoticed. Large random weights make every token and position matter.
    """
    model = tiny_model(seed, **overrides).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def returned_cache(out):
    """The KV cache of a forward output, under the field name of the installed transformers."""
    return getattr(out, CACHE_FIELD)


def greedy_by_recompute(model: GPT, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding the slow, obviously correct way: re-run the whole sequence for every token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_id], dim=1)
    return seq


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not available")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_tokenizer(shakespeare_text):
    return build_char_tokenizer(shakespeare_text, model_max_length=32)


def ids(*rows, seed=None, vocab=11, shape=None) -> torch.Tensor:
    if shape is not None:
        g = torch.Generator().manual_seed(seed or 0)
        return torch.randint(0, vocab, shape, generator=g)
    return torch.tensor(rows)


# ----------------------------------------------------------------------------- config


def test_config_aliases_and_model_type():
    config = tiny_config()
    assert config.model_type == "altgrad_gpt"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (16, 2, 2)
    assert config.max_position_embeddings == 16
    assert config.tie_word_embeddings is True
    assert GPTConfig(hidden_size=32, num_attention_heads=4).n_embd == 32
    # nanoGPT's model_args dict is accepted as is
    nanogpt_args = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, bias=False, vocab_size=65, dropout=0.2)
    assert GPTConfig(**nanogpt_args).n_embd == 384


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_layers=4), r"unknown key\(s\) \['n_layers'\].*n_layer"),
        (dict(max_length=20), r"unknown key\(s\) \['max_length'\]"),
        (dict(n_embd=10, n_head=3), r"n_embd \(10\) must be divisible by n_head \(3\)"),
        (dict(n_layer=0), r"n_layer must be a positive int"),
        (dict(block_size=2.5), r"block_size must be a positive int"),
        (dict(dropout=1.0), r"dropout"),
        (dict(bias="yes"), r"bias must be a bool"),
        (dict(eos_token_id=11), r"eos_token_id"),
        (dict(model_type="gpt2"), r"model_type"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_config_edited_after_construction_is_rechecked_by_model():
    config = tiny_config()
    config.n_head = 3
    with pytest.raises(ValueError, match="divisible"):
        GPT(config)


def test_config_round_trip(tmp_path):
    config = tiny_config(dropout=0.1, bias=False)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "altgrad_gpt" and saved["n_embd"] == 16
    loaded = GPTConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert GPTConfig(**config.to_dict()).to_dict() == config.to_dict()


# ----------------------------------------------------------------------------- forward


def test_logits_shape_and_loss():
    model = tiny_model().eval()
    x = ids(shape=(3, 7), seed=1)
    out = model(x)
    assert out.logits.shape == (3, 7, 11)
    assert out.loss is None

    out = model(x, labels=x)
    # Labels are unshifted: position t is scored against x[t + 1], the last position not at all.
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 11), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)

    # nanoGPT-style pre-shifted targets give the same loss through shift_labels.
    shifted = F.pad(x[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(x, shift_labels=shifted).loss, expected)

    # -100 is ignored; num_items_in_batch turns the mean into sum / count (gradient accumulation).
    labels = x.clone()
    labels[0, 3:] = -100
    n_items = int((labels[:, 1:] != -100).sum())
    mean_loss = model(x, labels=labels).loss
    sum_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(mean_loss, sum_loss / n_items)
    torch.testing.assert_close(model(x, labels=labels, num_items_in_batch=2 * n_items).loss, sum_loss / (2 * n_items))

    # logits_to_keep=1 is what generate uses: only the last position.
    torch.testing.assert_close(model(x, logits_to_keep=1).logits, out.logits[:, -1:])
    # return_dict=False gives a tuple, hidden states are embeddings + one per block (last after ln_f)
    assert isinstance(model(x, return_dict=False), tuple)
    hidden = model(x, output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.n_layer + 1


def test_kv_cache_is_built_only_for_decoding():
    model = tiny_model()
    x = ids(shape=(2, 6), seed=14)
    with torch.no_grad():
        assert returned_cache(model.train()(x)) is None  # training step
        assert returned_cache(model.eval()(x, labels=x)) is None  # eval loss
        out = model(x)  # eval decoding
        assert returned_cache(out).get_seq_length() == 6
        assert returned_cache(model(x, use_cache=False)) is None
    # The Trainer's predictions are the output fields not in keys_to_ignore_at_inference: not the cache.
    assert [k for k in out.keys() if k not in model.config.keys_to_ignore_at_inference] == ["logits"]


def test_causal_mask_future_tokens_do_not_leak():
    model = tiny_model().eval()
    x = ids(shape=(2, 12), seed=2)
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 11
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.5)
    x = ids(shape=(2, 10), seed=3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x).logits, model(x).logits)


def nanogpt_param_count(n_layer, n_embd, vocab_size, block_size, bias, tied=True):
    """Parameters by listing every tensor nanoGPT creates (independent of the model code)."""
    C = n_embd
    shapes = [(vocab_size, C), (block_size, C)]  # wte (shared with lm_head when tied), wpe
    for _ in range(n_layer):
        shapes += [(C,), (3 * C, C), (C, C), (C,), (4 * C, C), (C, 4 * C)]  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj
        if bias:
            shapes += [(C,), (3 * C,), (C,), (C,), (4 * C,), (C,)]
    shapes += [(C,)] + ([(C,)] if bias else [])  # ln_f
    if not tied:
        shapes.append((vocab_size, C))
    return sum(math.prod(s) for s in shapes)


@pytest.mark.parametrize("bias, tied", [(True, True), (False, True), (True, False)])
def test_parameter_count_matches_nanogpt_formula(bias, tied):
    model = tiny_model(n_layer=3, n_embd=24, n_head=3, vocab_size=13, block_size=9, bias=bias, tie_word_embeddings=tied)
    expected = nanogpt_param_count(3, 24, 13, 9, bias, tied)
    assert model.num_parameters() == expected
    assert model.get_num_params(non_embedding=False) == expected
    assert model.get_num_params() == expected - 9 * 24  # nanoGPT subtracts the position embeddings
    assert count_parameters(model.config) == {"total": expected, "non_embedding": expected - 9 * 24}
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied


def test_gpt2_init_is_applied_by_post_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=512))
    named = dict(model.named_parameters())
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, p in named.items():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - residual_std) < 0.1 * residual_std, name
        elif p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.002, name
            assert abs(p.mean().item()) < 0.002, name
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        else:  # Linear biases
            assert torch.all(p == 0), name
    assert model.lm_head.weight is model.transformer.wte.weight


def test_state_dict_keys_are_nanogpt_keys():
    keys = set(tiny_model(n_layer=1).state_dict())
    expected = {
        "transformer.wte.weight", "transformer.wpe.weight",
        "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight",
    }
    for sub in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
        expected |= {f"transformer.h.0.{sub}.weight", f"transformer.h.0.{sub}.bias"}
    assert keys == expected


def test_gradcheck_float64():
    model = tiny_model(n_layer=1, n_head=2, n_embd=4, block_size=4, vocab_size=5).double().eval()
    x = torch.tensor([[1, 4, 0, 2]])
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

    def f(*flat):
        out = torch.func.functional_call(model, dict(zip(names, flat)), (x,), {"labels": x}, tie_weights=True)
        # The logits and the float64 loss (it must not be downcast to float32 on the way).
        return out.logits, out.loss

    assert f(*params)[1].dtype == torch.float64
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)


def test_overfits_one_batch():
    model = tiny_model(n_embd=32)
    x = ids(shape=(4, 16), seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(x, labels=x).loss
        if loss.item() < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# ----------------------------------------------------------------------------- KV cache / generation


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cache_continuation_with_several_new_tokens(name):
    """A multi-token chunk after a cache needs a causal mask offset by the cache length. The cache is
    accepted under transformers' current name (`cache`, 5.24+) and the older `past_key_values`."""
    from transformers import DynamicCache

    model = tiny_model().eval()
    x = ids(shape=(2, 11), seed=6)
    with torch.no_grad():
        full = model(x).logits
        cache = DynamicCache(config=model.config)
        first = model(x[:, :4], use_cache=True, **{name: cache})
        assert returned_cache(first) is cache and cache.get_seq_length() == 4
        rest = model(x[:, 4:], use_cache=True, **{name: cache})
        assert cache.get_seq_length() == 11
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-6, rtol=1e-5)


def test_cache_under_both_names_is_an_error():
    from transformers import DynamicCache

    model = tiny_model().eval()
    x = ids(shape=(1, 3), seed=6)
    with pytest.raises(ValueError, match="not both"):
        model(x, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))


def test_left_padding_mask_in_forward_and_generate():
    model = tiny_model(block_size=24).double().eval()
    a = ids(shape=(1, 6), seed=7)
    b = ids(shape=(1, 3), seed=8)
    pad = 0
    batch = torch.cat([a, torch.cat([torch.full((1, 3), pad), b], 1)])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(batch, attention_mask=mask, position_ids=position_ids).logits
        assert torch.isfinite(logits).all()  # padding queries must not produce NaN
        torch.testing.assert_close(logits[0], model(a).logits[0])
        torch.testing.assert_close(logits[1, 3:], model(b).logits[0])

    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=pad)
    ref_a = model.generate(a, max_new_tokens=8, do_sample=False)
    ref_b = model.generate(b, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[0, -8:], ref_a[0, -8:])
    assert torch.equal(out[1, -8:], ref_b[0, -8:])


def test_attention_mask_with_zeros_is_not_ignored():
    model = tiny_model().eval()
    x = ids(shape=(1, 8), seed=9)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert not torch.allclose(model(x, attention_mask=mask).logits[:, -1], model(x).logits[:, -1])
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            model(x, attention_mask=mask[:, 1:])


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_generate_with_cache_equals_full_recompute(seed):
    """The KV cache may change the cost of decoding, never its result: `generate` with and without
    the cache and a full recompute per token give the same tokens, with the same scores.

    This is what broke silently when transformers 5.24 started passing the cache as `cache=`: a forward
    that only read `past_key_values` restarted every step from an empty cache at position 0."""
    model = lively_model(seed, block_size=32)
    prompt = ids(shape=(2, 5), seed=20 + seed)
    kwargs = dict(max_new_tokens=16, do_sample=False, return_dict_in_generate=True, output_scores=True)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    reference = greedy_by_recompute(model, prompt, 16)
    # Not one token repeated forever: that continuation would not notice a cache that forgets the past.
    assert all(len(set(row[-16:].tolist())) >= 2 for row in reference)
    assert torch.equal(uncached.sequences, reference)
    assert torch.equal(cached.sequences, reference)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores))


def left_pad(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D prompts of different lengths into (B, T) input_ids and attention_mask, padded on the left."""
    width = max(len(p) for p in prompts)
    input_ids = torch.stack([F.pad(p, (width - len(p), 0), value=pad) for p in prompts])  # (B, T)
    attention_mask = torch.stack([F.pad(torch.ones_like(p), (width - len(p), 0)) for p in prompts])  # (B, T)
    return input_ids, attention_mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_left_padded_generate_matches_each_row_alone(use_cache):
    model = lively_model(2, block_size=32)
    pad = 10  # prompts use ids 0..9 only, so no real token looks like padding
    prompts = [ids(shape=(1, n), seed=30 + n, vocab=10)[0] for n in (7, 3, 5)]
    batch, mask = left_pad(prompts, pad)
    out = model.generate(
        batch, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad, use_cache=use_cache
    )
    assert out.shape == (3, 7 + 10)
    for row, prompt in zip(out, prompts):
        alone = greedy_by_recompute(model, prompt[None], 10)[0]
        assert torch.equal(row[-10:], alone[-10:])


def test_generate_logs_no_deprecation_from_the_model(monkeypatch):
    """Nothing in a forward / generate round trip should use a deprecated transformers API (e.g. the
    `past_key_values` name on 5.24, which only logs once per process, hence the spy)."""
    logged = []
    real_warning_once = logging.Logger.warning_once

    def spy(self, msg, *args, **kwargs):
        logged.append(str(msg))
        return real_warning_once(self, msg, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "warning_once", spy)
    model = lively_model(3, block_size=32)
    batch, mask = left_pad([ids(shape=(1, n), seed=n, vocab=10)[0] for n in (4, 2)], pad=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(batch, attention_mask=mask, use_cache=True)
            returned_cache(out).get_seq_length()
            model(batch, labels=batch).loss.item()
        model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=10)
    messages = logged + [str(w.message) for w in caught]
    assert not [m for m in messages if "deprecat" in m.lower()], messages


def test_checkpointing_in_training_drops_an_explicit_cache():
    """Under activation checkpointing the backward pass replays each block; a KV cache would get every
    key appended twice. The model must run without it, whatever the transformers version."""
    model = tiny_model().train()
    model.activation_checkpointing_enable()
    x = ids(shape=(2, 8), seed=16)
    out = model(x, use_cache=True)
    assert returned_cache(out) is None
    out.logits.sum().backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is not None
    # Without a backward pass there is nothing to replay: decoding keeps its cache.
    with torch.no_grad():
        assert returned_cache(model.eval()(x, use_cache=True)).get_seq_length() == 8
    model.activation_checkpointing_disable()
    assert not any(block.gradient_checkpointing for block in model.transformer.h)


# ----------------------------------------------------------------------------- bad input


def test_sequence_past_block_size_is_a_clear_error():
    model = tiny_model(block_size=8).eval()
    with pytest.raises(ValueError, match="block_size is 8"):
        model(ids(shape=(1, 9)))
    with pytest.raises(ValueError, match="block_size=8"):
        model(ids(shape=(1, 4)), position_ids=torch.arange(6, 10)[None])
    # generate checks before generating anything, for a long prompt and for too many new tokens
    with pytest.raises(ValueError, match="block_size is 8"):
        model.generate(ids(shape=(1, 4)), max_new_tokens=5, do_sample=False)
    with pytest.raises(ValueError, match="block_size is 8"):
        model.generate(ids(shape=(1, 9)), max_new_tokens=1, do_sample=False)
    assert model.generate(ids(shape=(1, 4)), max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_token_ids_outside_vocab_are_a_clear_error(char_tokenizer):
    # A 65-character Shakespeare tokenizer with a model built for a 32-token vocabulary.
    model = tiny_model(vocab_size=32).eval()
    x = char_tokenizer("zebra", return_tensors="pt").input_ids
    assert x.max() >= 32
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=32\).*tokenizer"):
        model(x)
    with pytest.raises(ValueError, match="vocab_size=32"):
        model.generate(x, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="labels contains token ids outside"):
        model(ids(shape=(1, 4)), labels=torch.tensor([[1, 2, 40, -100]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[-1, 2]]))


# ----------------------------------------------------------------------------- training utilities


def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing: bool):
        model = tiny_model(dropout=0.1).train()
        calls = []
        # A pre-hook on the block's first module: torch stops the recompute early once every saved
        # tensor is rebuilt, so a hook at the end of the block might never fire a second time.
        model.transformer.h[0].ln_1.register_forward_pre_hook(lambda *_: calls.append(1))
        if checkpointing:
            # The non-deprecated name on transformers 5.23+; GPT provides it on older releases too.
            model.activation_checkpointing_enable()
            assert all(block.gradient_checkpointing for block in model.transformer.h)
        x = ids(shape=(2, 12), seed=10)
        torch.manual_seed(123)  # same dropout masks in both runs
        loss = model(x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)

    loss_ref, g_ref, calls_ref = grads(False)
    loss_ckpt, g_ckpt, calls_ckpt = grads(True)
    assert (calls_ref, calls_ckpt) == (1, 2)  # the block really was recomputed in backward
    torch.testing.assert_close(loss_ckpt, loss_ref)
    for name in g_ref:
        torch.testing.assert_close(g_ckpt[name], g_ref[name], msg=name)


def test_configure_optimizers_decays_only_matrices():
    model = tiny_model()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert not opt.defaults.get("fused")
    assert decay["lr"] == 1e-3 and decay["betas"] == (0.9, 0.95)


def test_configure_optimizers_asks_for_fused_adamw_on_cuda_only(monkeypatch):
    seen = []

    class SpyAdamW(torch.optim.AdamW):  # records the kwargs; the fused kernel itself needs a GPU
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, fused=None):
            seen.append(fused)
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    model = tiny_model()
    for device_type in ("cuda", "cpu", "mps"):
        model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device_type=device_type)
    assert seen == [True, None, None]


def test_crop_block_size():
    model = tiny_model(block_size=16).eval()
    x = ids(shape=(1, 8), seed=15)
    with torch.no_grad():
        before = model(x).logits
        model.crop_block_size(8)
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 16)
    with pytest.raises(ValueError, match="block_size is 8"):
        model(ids(shape=(1, 9)))


# ----------------------------------------------------------------------------- nanoGPT checkpoints


def nanogpt_state_dict(n_layer, n_head, n_embd, block_size, vocab_size, bias, seed=0):
    """Random weights keyed and shaped exactly like nanoGPT's model.state_dict() under torch.compile,
    including the `attn.bias` causal-mask buffers of nanoGPT without flash attention."""
    g = torch.Generator().manual_seed(seed)
    C = n_embd

    def rnd(*shape, scale=0.3, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": rnd(vocab_size, C), "transformer.wpe.weight": rnd(block_size, C)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = rnd(C, offset=1.0)
        if bias:
            sd[p + "ln_1.bias"] = rnd(C)
        sd[p + "attn.c_attn.weight"] = rnd(3 * C, C)
        if bias:
            sd[p + "attn.c_attn.bias"] = rnd(3 * C)
        sd[p + "attn.c_proj.weight"] = rnd(C, C)
        if bias:
            sd[p + "attn.c_proj.bias"] = rnd(C)
        sd[p + "attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        sd[p + "ln_2.weight"] = rnd(C, offset=1.0)
        if bias:
            sd[p + "ln_2.bias"] = rnd(C)
        sd[p + "mlp.c_fc.weight"] = rnd(4 * C, C)
        if bias:
            sd[p + "mlp.c_fc.bias"] = rnd(4 * C)
        sd[p + "mlp.c_proj.weight"] = rnd(C, 4 * C)
        if bias:
            sd[p + "mlp.c_proj.bias"] = rnd(C)
    sd["transformer.ln_f.weight"] = rnd(C, offset=1.0)
    if bias:
        sd["transformer.ln_f.bias"] = rnd(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # nanoGPT ties them: one tensor, two keys
    return {"_orig_mod." + k: v for k, v in sd.items()}


def reference_logits(sd, n_layer, n_head, idx):
    """nanoGPT's forward pass written out with plain tensor ops on the raw state dict."""
    sd = {k.removeprefix("_orig_mod."): v.double() for k, v in sd.items()}
    B, T = idx.shape
    C = sd["transformer.wte.weight"].shape[1]
    hs = C // n_head

    def layer_norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + 1e-5) * sd[name + ".weight"]
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def linear(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][torch.arange(T)]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        qkv = linear(layer_norm(x, p + "ln_1"), p + "attn.c_attn")
        q, k, v = (t.reshape(B, T, n_head, hs).transpose(1, 2) for t in qkv.split(C, dim=-1))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + linear(y, p + "attn.c_proj")
        h = linear(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
        x = x + linear(h, p + "mlp.c_proj")
    return layer_norm(x, "transformer.ln_f") @ sd["lm_head.weight"].T


@pytest.mark.parametrize("bias", [True, False])
def test_converted_nanogpt_checkpoint_matches_reference(tmp_path, bias):
    args = dict(n_layer=2, n_head=2, n_embd=8, block_size=12, bias=bias, vocab_size=13, dropout=0.0)
    sd = nanogpt_state_dict(2, 2, 8, 12, 13, bias)
    ckpt = {
        "model": sd,
        "model_args": args,
        "config": {"learning_rate": 1e-3, "dataset": "shakespeare_char", "compile": True},
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),
    }
    torch.save(ckpt, tmp_path / "ckpt.pt")
    convert_nanogpt_checkpoint(tmp_path / "ckpt.pt", tmp_path / "hf")

    model = GPT.from_pretrained(tmp_path / "hf").double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    x = ids(shape=(3, 12), seed=11, vocab=13)
    with torch.no_grad():
        logits = model(x).logits
    torch.testing.assert_close(logits, reference_logits(sd, 2, 2, x), rtol=1e-9, atol=1e-9)

    readme = (tmp_path / "hf" / "README.md").read_text()
    assert "dataset: shakespeare_char" in readme and "iter_num: 250" in readme


def test_converter_cli_with_meta_pkl(tmp_path, shakespeare_text):
    chars = sorted(set(shakespeare_text))
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, bias=False, vocab_size=len(chars), dropout=0.1)
    sd = nanogpt_state_dict(1, 2, 8, 16, len(chars), bias=False)
    torch.save({"model": sd, "model_args": args}, tmp_path / "ckpt.pt")

    convert_main([str(tmp_path / "ckpt.pt"), str(tmp_path / "hf"), "--meta", str(tmp_path / "meta.pkl")])

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok("ROMEO:").input_ids == [meta["stoi"][c] for c in "ROMEO:"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(model, GPT) and model.config.dropout == 0.1 and model.config.bias is False


def test_converter_rejects_non_nanogpt_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="model_args"):
        convert_nanogpt_checkpoint(tmp_path / "ckpt.pt", tmp_path / "hf")
    sd = nanogpt_state_dict(1, 2, 8, 16, 13, bias=True)
    args = dict(n_layer=1, n_head=2, n_embd=8, block_size=16, bias=True, vocab_size=17, dropout=0.0)
    torch.save({"model": sd, "model_args": args}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="transformer.wte.weight: checkpoint shape"):
        convert_nanogpt_checkpoint(tmp_path / "ckpt.pt", tmp_path / "hf")


# ----------------------------------------------------------------------------- save / load / Hub


def test_save_pretrained_round_trip_is_bit_identical(tmp_path):
    model = tiny_model(dropout=0.1, bias=False).eval()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "configuration_gpt.py", "modeling_gpt.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_gpt.GPTConfig",
        "AutoModelForCausalLM": "modeling_gpt.GPT",
    }
    assert config["architectures"] == ["GPT"]

    from transformers import AutoModelForCausalLM

    for loaded in (GPT.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert isinstance(loaded, GPTForCausalLM) and not loaded.training
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        x = ids(shape=(2, 16), seed=12)
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, model(x).logits)


_REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["altgrad"] = None  # make `import altgrad` fail before anything can import it
    try:
        import altgrad  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("altgrad is importable")
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, inputs_path, out_path, threads = sys.argv[1:5]
    torch.set_num_threads(int(threads))
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    x, batch, mask = torch.load(inputs_path)
    with torch.no_grad():
        logits = model(x).logits
    result = {"logits": logits, "module": type(model).__module__}
    for use_cache in (True, False):
        result[f"generated_{use_cache}"] = model.generate(
            x[:1, :4], max_new_tokens=6, do_sample=False, use_cache=use_cache
        )
        result[f"batched_{use_cache}"] = model.generate(
            batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=10, use_cache=use_cache
        )
    result["has_altgrad"] = any(m.startswith("altgrad") for m, v in sys.modules.items() if v is not None)
    torch.save(result, out_path)
    """
)


def test_loads_with_trust_remote_code_without_altgrad(tmp_path):
    # float32: what from_pretrained loads by default, so the logits can be compared bit for bit.
    model = lively_model(9).float()
    model.save_pretrained(tmp_path / "model")
    x = ids(shape=(2, 10), seed=13, vocab=10)
    prompts = [ids(shape=(1, n), seed=40 + n, vocab=10)[0] for n in (5, 2)]
    batch, mask = left_pad(prompts, pad=10)
    torch.save((x, batch, mask), tmp_path / "x.pt")
    (tmp_path / "load.py").write_text(_REMOTE_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), str(tmp_path / "model"), str(tmp_path / "x.pt"),
         str(tmp_path / "out.pt"), str(torch.get_num_threads())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    assert result["module"].startswith("transformers_modules") and not result["has_altgrad"]
    with torch.no_grad():
        assert torch.equal(result["logits"], model(x).logits)
    # The remote-code copy must use its KV cache correctly too: cached == uncached == full recompute.
    expected = greedy_by_recompute(model, x[:1, :4], 6)
    assert torch.equal(result["generated_True"], expected) and torch.equal(result["generated_False"], expected)
    for use_cache in (True, False):
        batched = result[f"batched_{use_cache}"]
        for row, prompt in zip(batched, prompts):
            assert torch.equal(row[-6:], greedy_by_recompute(model, prompt[None], 6)[0, -6:]), use_cache


def test_text_generation_pipeline_with_char_tokenizer(tmp_path, shakespeare_text):
    from transformers import pipeline

    tokenizer = build_char_tokenizer(shakespeare_text, model_max_length=32)
    model = lively_model(10, vocab_size=len(tokenizer), block_size=32).float()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    prompts = ["ROMEO:", "O, she"]
    expected = []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected.append(tokenizer.decode(greedy_by_recompute(generator.model, prompt_ids, 10)[0]))
    assert all(len(set(text[-10:])) >= 2 for text in expected)  # not just one token repeated

    for use_cache in (True, False):
        outputs = [generator(p, max_new_tokens=10, do_sample=False, use_cache=use_cache) for p in prompts]
        assert [out[0]["generated_text"] for out in outputs] == expected, use_cache

    # Batched: the pipeline pads the shorter prompt on the left.
    generator.tokenizer.pad_token = "\n"
    generator.tokenizer.padding_side = "left"
    batched = generator(prompts, batch_size=2, max_new_tokens=10, do_sample=False)
    assert [out[0]["generated_text"] for out in batched] == expected


def test_model_card(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    training = {"learning_rate": 6e-4, "max_iters": 5000, "betas": (0.9, 0.95), "dtype": torch.bfloat16}
    recipe = {"weights": "fp8_e4m3", "activations": "fp8_e4m3", "gradients": "fp8_e5m2", "scaling": "per-tensor"}
    card = write_model_card(tmp_path, model.config, training_config=training, quant_recipe=recipe, model_name="tiny")

    from huggingface_hub import ModelCard

    text = (tmp_path / "README.md").read_text()
    assert text == str(card)
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "transformers" and loaded.data.pipeline_tag == "text-generation"
    assert "custom_code" in loaded.data.tags
    assert f"**{model.num_parameters():,} parameters**" in text
    for line in ("model_type: altgrad_gpt", "n_layer: 2", "n_embd: 16", "block_size: 16", "vocab_size: 11",
                 f"parameters: {model.num_parameters()}", "learning_rate: 0.0006", "dtype: torch.bfloat16",
                 "weights: fp8_e4m3", "gradients: fp8_e5m2", "trust_remote_code=True"):
        assert line in text, line
    assert "```yaml" in text

    write_model_card(tmp_path, model.config)
    text = (tmp_path / "README.md").read_text()
    assert "Not recorded." in text and "trained in full precision" in text
    assert callable(model.push_to_hub)  # inherited; a real push needs the Hub


def test_block_is_a_gradient_checkpointing_layer():
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert issubclass(Block, GradientCheckpointingLayer)
    assert GPT.supports_gradient_checkpointing and GPT._supports_sdpa
    assert GPT.base_model_prefix == "transformer" and GPT.main_input_name == "input_ids"
    assert GPT._tied_weights_keys == {"lm_head.weight": "transformer.wte.weight"}
