"""Tensor layout of the synthetic Llama-shaped models the benchmarks build (random weights, no download)."""

from __future__ import annotations


def llama_tensor_shapes(shape: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every weight of a Llama with ``shape``'s sizes, in the order HF saves them.

    ``head_dim`` (default hidden / heads) sets the attention widths; ``qk_norm`` adds Qwen3's per-head
    q/k norms; ``tie_word_embeddings`` drops lm_head."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = d * shape["num_attention_heads"], d * shape["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
        if shape.get("qk_norm"):
            out += [(p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,))]
    out.append(("model.norm.weight", (h,)))
    return out if shape.get("tie_word_embeddings") else out + [("lm_head.weight", (v, h))]
