"""Tiny random transformers MoE models, one per family qmoe.hf supports,
built from configs (no download), for the qmoe.hf tests."""

from __future__ import annotations

from typing import Any, Callable, Dict

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False)


def _configs() -> Dict[str, Callable[[], Any]]:
    import transformers as tf

    return {
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=96,
                                            **COMMON),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=48, intermediate_size=96,
                                               norm_topk_prob=False, **COMMON),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                               intermediate_size=96, norm_topk_prob=True, head_dim=16, **COMMON),
        "qwen3_moe_nonorm": lambda: tf.Qwen3MoeConfig(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                                                      intermediate_size=96, norm_topk_prob=False, head_dim=16,
                                                      **COMMON),
        "gpt_oss": lambda: tf.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                                           head_dim=16, layer_types=["sliding_attention", "full_attention"],
                                           **COMMON),
        "olmoe": lambda: tf.OlmoeConfig(num_experts=8, num_experts_per_tok=2, intermediate_size=32,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=0, **COMMON),
        "granitemoe": lambda: tf.GraniteMoeConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                                  **COMMON),
        "deepseek_v3": lambda: tf.DeepseekV3Config(n_routed_experts=8, num_experts_per_tok=2,
                                                   moe_intermediate_size=32, intermediate_size=96,
                                                   n_shared_experts=1, n_group=2, topk_group=1,
                                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                   routed_scaling_factor=2.5, **COMMON),
        "phimoe": lambda: tf.PhimoeConfig(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                          **COMMON),
    }


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_nonorm", "gpt_oss", "olmoe", "granitemoe",
            "deepseek_v3", "phimoe"]


def tiny_model(family: str, seed: int = 0, dtype: Any = None) -> Any:
    """A random-initialized causal LM of ``family`` (eval mode, float32 unless dtype)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _configs()[family]()
    model = tf.AutoModelForCausalLM.from_config(cfg)
    # random init gives near-zero expert outputs with std 0.02: widen the experts and routers so
    # the MoE layers matter to the logits (and quantization error shows)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name or name.endswith("experts.gate_up_proj") or ".gate." in name or ".router." in name:
                p.normal_(0.0, 0.2)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def experts_modules(model: Any) -> list:
    """The experts modules of a model, transformers' or qmoe's, in module order."""
    return [m for m in model.modules()
            if type(m).__name__ == "QmoeExperts" or (hasattr(m, "is_transposed") and hasattr(m, "down_proj"))]


class PinnedRouting:
    """Makes models route every token as a reference model did.

    In bfloat16, a token whose k-th and (k+1)-th router scores differ by less
    than the rounding noise goes to other experts in one model than in
    another; that token's logits then differ by O(1), which says nothing
    about the experts' arithmetic. ``record(ref, ids)`` runs ``ref`` and keeps
    what its routers handed each experts module (top_k_index, top_k_weights);
    ``pin(model)`` makes ``model``'s experts modules receive exactly those
    (the weights in the dtype the model's router gives). Everything else --
    attention, norms, the experts' arithmetic -- stays each model's own.
    """

    def __init__(self) -> None:
        self.calls: list = []

    def record(self, ref: Any, ids: Any) -> Any:
        import torch

        hooks = [m.register_forward_pre_hook(lambda m, a: self.calls.append((a[1].clone(), a[2].clone())))
                 for m in experts_modules(ref)]
        with torch.no_grad():
            out = ref(ids).logits
        for h in hooks:
            h.remove()
        return out

    def pin(self, model: Any) -> None:
        it = iter(range(len(self.calls)))

        def hook(m: Any, a: tuple) -> tuple:
            idx, w = self.calls[next(it)]
            return (a[0], idx.to(a[1].device), w.to(a[2].device, a[2].dtype))

        for m in experts_modules(model):
            m.register_forward_pre_hook(hook)
