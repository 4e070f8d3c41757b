"""Write a tiny llama GGUF whose weights are set by hand, not trained, so that it calls a tool: a model with a
script. tiny_gguf's random model never calls a tool, and no model weights can be downloaded here; this one lets
the tool round trips of the Responses, Messages and Agents SDK tests run against a real llama-server, its chat
template, its tool-call parser, its lazy grammar and its streaming.

The script, with `tools` in the request (the template renders them, as Qwen2.5's does, Hermes style):
- no tool result in the conversation yet: it answers with a call to get_weather, arguments {"city": "Paris"};
- a tool result in the conversation: it answers ANSWER in words.

How a transformer runs a script (one layer; the feed-forward block is zero, so it adds nothing):
- Every token's embedding is a one in a shared "bias" dimension, plus a one in a dimension of its own for the
  tokens the script continues (the last token of the generation prompt and every scripted token). The output
  matrix maps "own dimension of token s" to "logit of the token that follows s" with a margin of tens of logits,
  so the next token is a function of the current one: a bigram model, deterministic under any sampler settings.
- One attention head decides between the two answers: its query is constant (read from the bias dimension) and
  only `<tool_response>` has a key, so with a tool result anywhere before, attention lands on it (score ~20 against
  0) and copies a one into a "mode" dimension; without one, the head averages values that are all zero. The mode
  dimension moves the first answer token from the tool call to the words. Query and key sit in the head's last
  RoPE pair with a large frequency base, where the rotation is ~1e-3 rad at position 1000: position blind.
- Every scripted token is distinct (a token may be many characters: llama.cpp's tokens are strings), so the
  bigram chain never loops; `<|im_end|>` (end of generation) follows the last one.

The vocabulary also carries fill-in-the-middle tokens, so /infill answers.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np

TOOL_NAME = "get_weather"
TOOL_ARGS = {"city": "Paris"}
ANSWER = "It is sunny in Paris."
WEATHER_TOOL_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}

# Written for this model in the shape of Qwen2.5's template (Hermes-style tool calls), which llama.cpp's template
# analysis recognises: tools listed in the system turn, calls as <tool_call>{json}</tool_call>, results in a user
# turn as <tool_response>.
TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call one or more functions. Their signatures, within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{%- if message.content %}
{{ message.content }}
{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user
{%- endif %}
<tool_response>
{{ message.content }}
</tool_response>
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

SPECIALS = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
MARKER = "<tool_response>"
# The call, as the template writes one, in pieces that each occur once; then the words.
CALL = ["<tool_call>", '\n{"name": "' + TOOL_NAME + '", ', '"arguments": {"city": ', '"Paris"}}\n', "</tool_call>"]
WORDS = ["It is sunny", " in Paris."]
USER_DEFINED = [MARKER, "</tool_response>", *CALL, *WORDS]

N_EMBD, N_HEAD, N_FF = 128, 2, 32
HEAD = N_EMBD // N_HEAD
BIAS, MARK, MODE = 0, 1, 2  # embedding dimensions; the scripted tokens' own dimensions follow
QK = HEAD - 2  # the head's last RoPE pair turns slowest: (QK, QK + 1)
MARGIN = 10.0  # per unit of normalised activation: ~80 logits between the scripted token and the rest


def write_scripted_llama(path: Path) -> Path:
    import gguf

    tokens = [*SPECIALS, *(f"<0x{i:02X}>" for i in range(256)), *USER_DEFINED]
    types = (
        [gguf.TokenType.UNKNOWN]
        + [gguf.TokenType.CONTROL] * (len(SPECIALS) - 1)
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.USER_DEFINED] * len(USER_DEFINED)
    )
    ids = {t: i for i, t in enumerate(tokens)}
    newline = ids["<0x0A>"]  # the last token of the generation prompt "<|im_start|>assistant\n"
    eos = ids["<|im_end|>"]
    n_vocab = len(tokens)

    # Who follows whom: the generation prompt's end is followed by the call (mode 0) or the words (mode 1).
    follows = {ids[a]: ids[b] for a, b in pairwise(CALL)} | {ids[CALL[-1]]: eos}
    follows |= {ids[a]: ids[b] for a, b in pairwise(WORDS)} | {ids[WORDS[-1]]: eos}
    own = {tok: 3 + n for n, tok in enumerate([newline, *follows])}
    assert 3 + len(own) <= N_EMBD

    embd = np.zeros((n_vocab, N_EMBD), np.float32)
    embd[:, BIAS] = 1.0
    embd[ids[MARKER], MARK] = 1.0
    for tok, dim in own.items():
        embd[tok, dim] = 1.0

    # Attention (head 0 only). After the RMS norm a token with two ones reads sqrt(N_EMBD / 2) = 8 in each, so the
    # marker's score is (1.6 * 8) * (1.6 * 8) / sqrt(HEAD) = 20.5, and every other score is 0.
    wq = np.zeros((N_EMBD, N_EMBD), np.float32)
    wk = np.zeros((N_EMBD, N_EMBD), np.float32)
    wv = np.zeros((N_EMBD, N_EMBD), np.float32)
    wo = np.zeros((N_EMBD, N_EMBD), np.float32)
    wq[QK, BIAS] = 1.6
    wk[QK, MARK] = 1.6
    wv[0, MARK] = 1.0 / 8.0  # the marker's value, ~1 after the norm's 8
    wo[MODE, 0] = 1.0  # written into the mode dimension of the residual stream

    out = np.zeros((n_vocab, N_EMBD), np.float32)
    for tok, nxt in follows.items():
        out[nxt, own[tok]] = MARGIN
    # After the generation prompt: the call leads by 3 units without a tool result; with one, the words lead by 3.
    first_call, first_word = ids[CALL[0]], ids[WORDS[0]]
    out[first_call, own[newline]] = MARGIN
    out[first_word, own[newline]] = MARGIN - 3.0
    out[first_call, MODE] = -3.0
    out[first_word, MODE] = 3.0

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("portcullis-scripted-test")
    writer.add_context_length(4096)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(1)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(HEAD)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n_vocab)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(True)
    writer.add_uint32("tokenizer.ggml.fim_pre_token_id", ids["<|fim_prefix|>"])
    writer.add_uint32("tokenizer.ggml.fim_suf_token_id", ids["<|fim_suffix|>"])
    writer.add_uint32("tokenizer.ggml.fim_mid_token_id", ids["<|fim_middle|>"])
    writer.add_chat_template(TEMPLATE)

    writer.add_tensor("token_embd.weight", embd)
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    writer.add_tensor("output.weight", out)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(N_EMBD, np.float32))
    for name, w in (("attn_q", wq), ("attn_k", wk), ("attn_v", wv), ("attn_output", wo)):
        writer.add_tensor(f"blk.0.{name}.weight", w)
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(N_EMBD, np.float32))
    writer.add_tensor("blk.0.ffn_gate.weight", np.zeros((N_FF, N_EMBD), np.float32))
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((N_FF, N_EMBD), np.float32))
    writer.add_tensor("blk.0.ffn_down.weight", np.zeros((N_EMBD, N_FF), np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
