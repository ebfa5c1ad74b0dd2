"""altgrad's GPT (nanoGPT architecture) as a first-class transformers 5.x model.

Importing this package registers the model with transformers' Auto classes, so a saved directory
loads with `AutoModelForCausalLM.from_pretrained(dir)` here, and, because `save_pretrained` also
copies `configuration_gpt.py` / `modeling_gpt.py` next to the weights, with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` where altgrad is not installed.

Example:

```python
>>> import tempfile
>>> from transformers import AutoModelForCausalLM
>>> from altgrad.modeling import GPT, GPTConfig, build_char_tokenizer
>>> tok = build_char_tokenizer("First Citizen: Before we proceed any further, hear me speak.", model_max_length=64)
>>> model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=len(tok)))
>>> out = tempfile.mkdtemp()
>>> model.save_pretrained(out)
>>> _ = tok.save_pretrained(out)
>>> type(AutoModelForCausalLM.from_pretrained(out)).__name__
'GPT'

```
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_gpt import GPTConfig
from .model_card import write_model_card
from .modeling_gpt import GPT, GPTForCausalLM, GPTPreTrainedModel
from .tokenization import build_char_tokenizer, train_bpe_tokenizer

# In-process lookup by model_type ("altgrad_gpt" in config.json) ...
AutoConfig.register(GPTConfig.model_type, GPTConfig, exist_ok=True)
AutoModelForCausalLM.register(GPTConfig, GPT, exist_ok=True)
# ... and remote code: save_pretrained copies the two source files and writes `auto_map`.
GPTConfig.register_for_auto_class()
GPT.register_for_auto_class("AutoModelForCausalLM")


def __getattr__(name):
    # Imported lazily so that `python -m altgrad.modeling.convert_nanogpt` does not find the module
    # already imported by this package (runpy warns about that).
    if name in ("convert_nanogpt_checkpoint", "nanogpt_state_dict_to_hf"):
        from . import convert_nanogpt

        return getattr(convert_nanogpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GPT",
    "GPTConfig",
    "GPTForCausalLM",
    "GPTPreTrainedModel",
    "build_char_tokenizer",
    "convert_nanogpt_checkpoint",
    "nanogpt_state_dict_to_hf",
    "train_bpe_tokenizer",
    "write_model_card",
]
