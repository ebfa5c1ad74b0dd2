"""altgrad's GPT: nanoGPT's model.py as a transformers 5.x causal language model.

The architecture, parameter names and initialization are nanoGPT's (Karpathy, MIT licence), so a
nanoGPT state dict loads without renaming. What transformers adds on top: `save_pretrained` /
`from_pretrained` / `push_to_hub`, `generate` with a KV cache (`DynamicCache`), `pipeline(...)`,
padding masks, gradient checkpointing and the usual `CausalLMOutputWithPast`.

Two behaviours differ from nanoGPT on purpose:
  * `labels` are the *unshifted* input ids (transformers' convention): position t is scored
    against labels[t + 1]. nanoGPT-style pre-shifted targets go in `shift_labels=` instead.
  * Asking for positions past `block_size` raises a ValueError instead of an index error (nanoGPT
    asserts in forward and silently crops the context in its own `generate`).

This file is copied next to the weights by `save_pretrained` (remote code), so it must stay
self-contained: torch, transformers and `.configuration_gpt` only, never `altgrad`. For the same reason
it must work with every transformers 5.x release the package supports, not just the installed one: a
saved model is loaded by whatever version its user has. The API differences it bridges:
  * the KV cache is called `cache` from transformers 5.24 on (the forward argument `generate` passes
    and the output field it reads) and `past_key_values` before. `forward` accepts both names, and
    the output uses the field the installed `CausalLMOutputWithPast` declares (`_CACHE_FIELD`).
  * `activation_checkpointing_enable` (5.23+) is `gradient_checkpointing_enable` before (deprecated
    since 5.23); the new name is provided on older releases too, so callers can use it everywhere.
  * `slice_logits_to_keep` only exists from 5.21 on; an equivalent is defined for older releases.
"""

import inspect
import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import can_return_tuple, logging

from .configuration_gpt import GPTConfig

try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.21

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """transformers' `slice_logits_to_keep` (5.21+): an int n > 0 keeps the last n positions, 0 keeps
        all; a 1-D tensor selects the same positions in every row; a 2-D integer tensor (B, n) selects
        positions per row; a 2-D bool mask (B, T) keeps its True positions, flattened to (count, C)."""
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
            if logits_to_keep.dtype == torch.bool:
                return hidden_states[logits_to_keep]
            return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None)
        return hidden_states[:, logits_to_keep, :]


logger = logging.get_logger(__name__)

# Name of the KV-cache field of transformers' model outputs: `cache` from 5.24 on, `past_key_values`
# before. 5.24 still accepts and reads the old name, but logs a deprecation warning for it, and older
# releases know only the old one, so the field is looked up rather than hard-coded.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _is_compiling() -> bool:
    # The input checks below read tensor values on the host; under torch.compile that is a graph
    # break, so they are skipped there (the eager path is where people debug bad inputs anyway).
    return torch.compiler.is_compiling()


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Next-token cross entropy with transformers' `ForCausalLMLoss` semantics.

    `labels` are unshifted (the shift happens here); `shift_labels` are already shifted (nanoGPT's
    targets). With `num_items_in_batch` the summed loss is divided by it instead of averaged, so
    gradient accumulation over micro-batches of unequal token counts weighs every token equally.

    Unlike transformers' version, logits are upcast only from half precision: `logits.float()` there
    would silently *downcast* float64, which breaks gradcheck.

    Example:

    ```python
    >>> logits = torch.zeros(1, 3, 5)
    >>> causal_lm_loss(logits, torch.tensor([[1, 2, 3]]), vocab_size=5)  # log(5)
    tensor(1.6094)

    ```
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if shift_labels is None:
        # Pad with ignore_index so position T-1 (which has no next token) drops out of the loss.
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nanoGPT's fused `c_attn` (q, k, v) projection.

    `attention_mask` is None (plain causal attention, SDPA's fused kernel) or a boolean
    (B or 1, 1, T, S) mask, True = may attend, that already contains the causal part. The caller
    (`GPT.forward`) guarantees a mask whenever queries do not start at key position 0. `cache` is a
    transformers `Cache` that this layer appends its keys and values to (slot `layer_idx`).
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        # key, query, value projections for all heads, in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection; it writes into the residual stream, hence the scaled init
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj._is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slot of the KV cache this layer owns

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        hs = C // self.n_head

        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            # Append this step's keys/values and get back the whole history.
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs), S = past + T

        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            # With a single query (cached decoding) everything in the cache is in the past.
            is_causal=attention_mask is None and T > 1,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        y = self.resid_dropout(self.c_proj(y))  # (B, T, C)
        return y


class MLP(nn.Module):
    """Position-wise feed-forward: 4x expansion, exact (erf) GELU, projection back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj._is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)  # (B, T, 4C)
        x = self.gelu(x)
        x = self.c_proj(x)  # (B, T, C)
        x = self.dropout(x)
        return x


class Block(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    Subclassing `GradientCheckpointingLayer` is how transformers v5 checkpoints layers: once
    `model.activation_checkpointing_enable()` is called, calling the block re-runs its forward in the
    backward pass instead of storing activations. `x` must therefore be passed positionally. (The KV
    cache never reaches a checkpointed block: `GPT.forward` drops it, see there.)
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attention_mask=attention_mask, cache=cache)
        x = x + self.mlp(self.ln_2(x))
        return x  # (B, T, C)


class GPTPreTrainedModel(PreTrainedModel):
    """Weight init and the class attributes transformers reads (loading, device maps, checkpointing)."""

    config: GPTConfig
    config_class = GPTConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    # Inputs that accelerate's device-map hooks must not move: the KV cache, under both its names.
    _skip_keys_device_placement = ["cache", "past_key_values"]
    # Attention always goes through F.scaled_dot_product_attention (there is no eager or flash path).
    _supports_sdpa = True
    # nanoGPT checkpoints from before PyTorch 2.0 stored the causal mask as a buffer `attn.bias`.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$"]

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
        # transformers < 5.23 only has the old names, which 5.23+ deprecates. Providing the new ones
        # here lets callers (and our tests) use `activation_checkpointing_*` on every version.

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None):
            """Checkpoint every block: recompute its activations in backward instead of storing them."""
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

        def activation_checkpointing_disable(self):
            """Store activations again (undoes `activation_checkpointing_enable`)."""
            self.gradient_checkpointing_disable()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """GPT-2 init: N(0, 0.02) for Linear and Embedding weights, zero biases, unit LayerNorm gains,
        and N(0, 0.02 / sqrt(2 * n_layer)) for the two projections per block that write into the
        residual stream, so its variance does not grow with depth.

        transformers calls this once per module from `post_init()` (and, on `from_pretrained`, only
        for weights missing from the checkpoint). The `init.*` functions skip tensors already
        loaded, which plain `torch.nn.init` would overwrite.
        """
        std = 0.02
        if isinstance(module, nn.Linear):
            if getattr(module, "_is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)


class GPT(GPTPreTrainedModel, GenerationMixin):
    r"""nanoGPT's GPT language model as a transformers causal LM (also exported as `GPTForCausalLM`).

    State-dict keys are nanoGPT's (`transformer.wte`, `transformer.h.0.attn.c_attn`, ..., `lm_head`),
    and `lm_head.weight` is tied to `transformer.wte.weight` when `config.tie_word_embeddings`.

    Example:

    ```python
    >>> import torch
    >>> from altgrad.modeling import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65))
    >>> idx = torch.randint(0, 65, (4, 16))
    >>> out = model(idx, labels=idx)  # labels are unshifted; the model shifts them
    >>> out.logits.shape, out.loss.shape
    (torch.Size([4, 16, 65]), torch.Size([]))
    >>> model.eval().generate(idx[:1, :4], max_new_tokens=8, do_sample=False).shape
    torch.Size([1, 12])

    ```
    """

    # transformers v5 form: {target: source}. `lm_head.weight` becomes the very same Parameter as
    # `transformer.wte.weight` (nanoGPT's weight tying), and is not stored twice on save.
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        # Fields may have been edited after the config was built; fail here, not deep in forward.
        config.validate_architecture()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, layer_idx) for layer_idx in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # The class name "GPT" matches none of transformers' loss types; ours keeps float64 intact.
        self.loss_function = causal_lm_loss
        # Initializes all weights via `_init_weights`, then ties lm_head to wte.
        self.post_init()

    # -- embeddings accessors: transformers looks for `embed_tokens` by default -----------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding):
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    # -- nanoGPT utilities --------------------------------------------------------------------
    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters, counting the tied embedding once (as nanoGPT does).

        With `non_embedding=True` the position embeddings are subtracted; the token embedding stays
        in because, tied, it is also the output layer's weight.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on every >=2-D parameter (matmul weights, embeddings) and none on
        1-D ones (biases, LayerNorm gains): those set scales and offsets rather than interactions,
        and pulling them towards zero regularizes nothing.

        Example:

        ```python
        >>> model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65))
        >>> opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type="cpu")
        >>> [len(g["params"]) for g in opt.param_groups]  # decayed (2-D), not decayed (1-D)
        [10, 18]

        ```
        """
        # named_parameters() yields a tied tensor once, so it is never in two groups.
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay_params = [p for p in param_dict.values() if p.dim() >= 2]
        nodecay_params = [p for p in param_dict.values() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        # One fused kernel per step instead of a loop over tensors: a clear win on CUDA, where nanoGPT
        # measured it. Elsewhere availability depends on the PyTorch version, so stay unfused.
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra_args = dict(fused=True) if fused_available and device_type == "cuda" else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=tuple(betas), **extra_args)

    def crop_block_size(self, block_size: int):
        """Shrink the context window (e.g. a 1024-position checkpoint finetuned at 256)."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in (0, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())
        self.transformer.wpe.num_embeddings = block_size

    def estimate_mfu(self, fwdbwd_per_iter: int, dt: float, peak_flops: float = 312e12) -> float:
        """Model FLOPs utilization (PaLM appendix B) of `fwdbwd_per_iter` sequences in `dt` seconds,
        as a fraction of `peak_flops` (default: A100 bf16 dense)."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    # -- input checks -------------------------------------------------------------------------
    def _check_ids(self, ignore_index: int, **named_ids: torch.Tensor | None):
        """Token ids outside the vocabulary are an IndexError on CPU and a device-side assert (which
        kills the CUDA context) on GPU; the usual cause is a tokenizer that does not match the model.
        One host sync for all tensors together."""
        if _is_compiling():
            return
        vocab_size = self.config.vocab_size
        named_ids = {name: ids for name, ids in named_ids.items() if ids is not None}
        flags = []
        for name, ids in named_ids.items():
            bad = (ids < 0) | (ids >= vocab_size)
            if name != "input_ids":  # label tensors may carry the ignore index
                bad &= ids != ignore_index
            flags.append(bad.any())
        for (name, ids), is_bad in zip(named_ids.items(), torch.stack(flags).tolist() if flags else []):
            if is_bad:
                raise ValueError(
                    f"{name} contains token ids outside [0, vocab_size={vocab_size}) (min {int(ids.min())}, "
                    f"max {int(ids.max())}). The tokenizer and the model disagree on the vocabulary: use the "
                    "tokenizer the model was trained with, or a config with a large enough vocab_size."
                )

    def _check_positions(self, position_ids: torch.Tensor | None, past_length: int, seq_length: int):
        block_size = self.config.block_size
        if position_ids is None:
            # Shapes only: no host sync on the training path.
            if past_length + seq_length > block_size:
                raise ValueError(
                    f"Sequence too long: {past_length} cached + {seq_length} new tokens = "
                    f"{past_length + seq_length} positions, but block_size is {block_size} (the model has "
                    "no position embedding beyond it). Truncate the input to its last block_size tokens, "
                    "or generate fewer new tokens."
                )
            return
        if position_ids.shape[-1] != seq_length:
            raise ValueError(
                f"position_ids has length {position_ids.shape[-1]}, input_ids has length {seq_length}"
            )
        if _is_compiling():
            return
        lo, hi = torch.stack([position_ids.min(), position_ids.max()]).tolist()
        if lo < 0 or hi >= block_size:
            raise ValueError(
                f"position_ids span [{lo}, {hi}], but positions must lie in [0, block_size={block_size}) "
                "(the model has no position embedding beyond it). Truncate the prompt or generate fewer tokens."
            )

    @staticmethod
    def _causal_mask(seq_length: int, past_length: int, device: torch.device) -> torch.Tensor:
        """(T, S) boolean mask, True where query t (absolute position past + t) may see key s."""
        q_pos = torch.arange(past_length, past_length + seq_length, device=device)  # (T,)
        k_pos = torch.arange(past_length + seq_length, device=device)  # (S,)
        return k_pos[None, :] <= q_pos[:, None]  # (T, S)

    def _attention_mask(
        self, attention_mask: torch.Tensor | None, batch_size: int, seq_length: int, past_length: int, device
    ) -> torch.Tensor | None:
        """Turn transformers' 2-D padding mask (B, past + T), 1 = real token, into the boolean
        (B, 1, T, S) mask SDPA takes, or None when plain causal attention is exact (fast path)."""
        total = past_length + seq_length
        if attention_mask is not None and attention_mask.dim() == 4:
            # Already expanded by the caller (e.g. transformers with a static cache): bool (True =
            # attend) or additive float, with the causal part included. SDPA takes either.
            return attention_mask
        if attention_mask is not None:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch_size, total):
                raise ValueError(
                    f"attention_mask must have shape (batch, past + new tokens) = ({batch_size}, {total}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            keep = attention_mask.bool()  # (B, S)
            if _is_compiling() or not bool(keep.all()):
                mask = self._causal_mask(seq_length, past_length, device)[None, None] & keep[:, None, None, :]
                # A padding query sees no key at all and SDPA would return NaN for it (NaN that then
                # leaks into gradients). Let every query see itself: padding outputs are garbage that
                # no real token attends to, and that the loss must ignore (label -100).
                q_pos = torch.arange(past_length, total, device=device)  # (T,)
                k_pos = torch.arange(total, device=device)  # (S,)
                diag = k_pos[None, :] == q_pos[:, None]  # (T, S)
                return mask | diag[None, None]  # (B, 1, T, S)
        if past_length > 0 and seq_length > 1:
            # SDPA's is_causal aligns the mask to the top-left corner, which is wrong once the
            # queries are preceded by cached keys: build the offset causal mask explicitly.
            return self._causal_mask(seq_length, past_length, device)[None, None]  # (1, 1, T, S)
        return None

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, past + T), 1 for real tokens and 0 for padding (left padding for
                batched generation); or an already expanded (B, 1, T, past + T) mask.
            position_ids: (B or 1, T) positions; default past + arange(T). `generate` derives them
                from the attention mask so left-padded rows start at position 0.
            cache: the KV cache, a transformers `Cache` (e.g. `DynamicCache`), updated in place. Its
                name since transformers 5.24, where `generate` passes it as `cache=`.
            labels: (B, T) *unshifted* targets, usually `input_ids` (-100 = ignore). Loss is the mean
                next-token cross entropy. kwargs `num_items_in_batch` (sum / count instead of mean,
                for gradient accumulation) and `shift_labels` (nanoGPT's pre-shifted targets, used
                instead of labels) are honoured.
            use_cache: build / return a KV cache. Default: `config.use_cache` in eval mode without
                labels; off in train mode or when computing a loss (nothing would reuse it).
                `generate` always passes it explicitly.
            logits_to_keep: int n > 0 computes logits for the last n positions only (what `generate`
                does); 0 keeps all. A tensor selects positions.
            past_key_values: the same KV cache under its name before transformers 5.24 (what `generate`
                passes there, and what older callers use). Give one of the two names, not both.
            kwargs: `output_hidden_states` (embeddings, each block's output, the final-LayerNorm
                output), `return_dict`; others transformers passes are ignored.

        Returns:
            `CausalLMOutputWithPast` with logits (B, T', vocab_size), loss (scalar or None), the KV
            cache (field `cache` on transformers 5.24+, `past_key_values` before; None when unused),
            hidden_states.
        """
        if input_ids is None:
            raise ValueError("GPT.forward needs input_ids (this model has no inputs_embeds path)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        batch_size, seq_length = input_ids.shape
        device = input_ids.device
        shift_labels = kwargs.get("shift_labels")
        ignore_index = kwargs.get("ignore_index", -100)
        self._check_ids(ignore_index, input_ids=input_ids, labels=labels, shift_labels=shift_labels)

        if past_key_values is not None:
            # The pre-5.24 name, from transformers' own `generate` before 5.24 or from older callers.
            # Accepted silently: on those versions it is the only name there is.
            if cache is not None and cache is not past_key_values:
                raise ValueError("Got two KV caches, `cache` and `past_key_values`: pass one, not both.")
            cache = past_key_values

        if use_cache is None:
            # A cache only pays off when decoding. Keeping every layer's K/V alive through a training
            # step or an eval-loss pass would just cost memory (2 * n_layer * B * T * C values).
            use_cache = self.config.use_cache and not self.training and labels is None and shift_labels is None
        if (use_cache or cache is not None) and self._checkpointing_active():
            # The backward pass re-runs each checkpointed block, which would append its keys and values
            # to the cache a second time. transformers >= 5.24 strips a `cache` kwarg from checkpointed
            # layers itself, older releases only `past_key_values`: doing it here works on all of them.
            logger.warning_once("The KV cache is not used under activation checkpointing in training: ignoring it.")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0

        self._check_positions(position_ids, past_length, seq_length)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq_length, device=device).unsqueeze(0)  # (1, T)
        mask = self._attention_mask(attention_mask, batch_size, seq_length, past_length, device)

        output_hidden_states = kwargs.get("output_hidden_states")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        all_hidden_states = () if output_hidden_states else None

        tok_emb = self.transformer.wte(input_ids)  # token embeddings (B, T, C)
        pos_emb = self.transformer.wpe(position_ids)  # position embeddings (1 or B, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            if output_hidden_states:
                all_hidden_states += (x,)
            x = block(x, attention_mask=mask, cache=cache)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if output_hidden_states:
            all_hidden_states += (x,)

        logits = self.lm_head(slice_logits_to_keep(x, logits_to_keep))  # (B, T', vocab_size)

        loss = None
        if labels is not None or shift_labels is not None:
            target = labels if labels is not None else shift_labels
            if logits.shape[:2] != target.shape[:2]:
                raise ValueError(
                    f"logits {tuple(logits.shape[:2])} and labels {tuple(target.shape)} cover different "
                    "positions: a loss needs the logits of every position (leave logits_to_keep=0)."
                )
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                num_items_in_batch=kwargs.get("num_items_in_batch"),
                ignore_index=ignore_index,
                shift_labels=shift_labels,
            )

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=all_hidden_states,
            **{_CACHE_FIELD: cache},  # `cache=` on transformers 5.24+, `past_key_values=` before
        )

    def _checkpointing_active(self) -> bool:
        """True when the blocks will be recomputed in backward (checkpointing on, training, autograd on)."""
        return self.training and torch.is_grad_enabled() and any(b.gradient_checkpointing for b in self.transformer.h)

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        # Fail before generating anything rather than at the first position past block_size.
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        max_length = generation_config.max_length
        if max_length is not None and max_length > self.config.block_size:
            raise ValueError(
                f"Generation would reach {max_length} tokens (prompt {input_ids_length} + "
                f"{max_length - input_ids_length} new), but block_size is {self.config.block_size}: the "
                "model has no position embedding past it. Lower max_new_tokens, or truncate the prompt."
            )


GPTForCausalLM = GPT

__all__ = ["GPT", "GPTForCausalLM", "GPTPreTrainedModel", "causal_lm_loss"]
