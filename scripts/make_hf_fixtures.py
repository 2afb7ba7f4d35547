#!/usr/bin/env python3
"""Write tiny Hugging-Face-named MoE checkpoints plus reference outputs of the HF MoE block.

For each fixture NAME this writes tests/data/hf/NAME/:
  config.json          HF-style config (sorted keys)
  model.safetensors    tensors under their Hub checkpoint names (F32, or BF16 for mixtral_bf16),
                       plus one unrelated tensor (embeddings) and, where the architecture has
                       them, the dense-MLP tensors of the layers before the MoE layer
  expected.safetensors x F64 (T,d); ids I64 (T,k) in descending selection-key order;
                       weights F64 (T,k); y_f64 F64 (T,d) (all arithmetic in float64);
                       y_f32 F32 (T,d) (float32, HF's op order). __metadata__ holds layer,
                       architecture and generator.

Run from anywhere (Debian's python with python3-torch; no transformers/safetensors needed):
    /usr/bin/python3 scripts/make_hf_fixtures.py
Deterministic: fixed seeds, so two runs give byte-identical files. Draws where routing is
nearly tied (selection-key or group-score gap < 1e-3) are rejected and redrawn.

The MoE blocks follow huggingface/transformers (main-branch snapshots, v4.5x era, plus the v5
fused-expert rewrite of deepseek_v2; the routing maths is the same in both; commit prefixes given):
  mixtral             models/mixtral/modeling_mixtral.py (00d4b3d2)       MixtralSparseMoeBlock
  qwen2_moe           models/qwen2_moe/modeling_qwen2_moe.py (00a3f938)   Qwen2MoeSparseMoeBlock
  qwen3_moe           models/qwen3_moe/modeling_qwen3_moe.py (00d4b3d2)   Qwen3MoeSparseMoeBlock
  olmoe               models/olmoe/modeling_olmoe.py (00dcc6dd)           OlmoeSparseMoeBlock
  deepseek_v2(_lite)  models/deepseek_v2/modeling_deepseek_v2.py (03eac6f6, 0233e509)
                      DeepseekV2MoEGate / DeepseekV2MoE
  deepseek_v3         models/deepseek_v3/modeling_deepseek_v3.py (00b676f8) DeepseekV3TopkRouter / DeepseekV3MoE
  switch_transformers models/switch_transformers/modeling_switch_transformers.py (00dcc6dd)
                      SwitchTransformersTop1Router / SwitchTransformersSparseMLP; sparse blocks from
                      SwitchTransformersStack (i % encoder_sparse_step == 1, or step == 1) and
                      configuration_switch_transformers.py (057369a4)
"""
import array
import dataclasses
import json
import os
import struct
import sys
import zlib

import torch
import torch.nn.functional as F

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
OUT = os.path.join(ROOT, "tests", "data", "hf")
D, FF, T, VOCAB = 16, 12, 7, 4
W_STD, GATE_STD, MIN_GAP = 0.3, 0.6, 1e-3


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    config: dict                  # HF config.json keys (dtype/arch keys added below)
    E: int = 8
    k: int = 2
    L: int = 0                    # index of the MoE layer in the checkpoint
    prefix: str = "model.layers.{L}.mlp"
    gate: str = "gate.weight"
    expert: str = "experts.{e}.{p}.weight"
    projs: tuple = ("gate_proj", "up_proj", "down_proj")  # (gate, up, down) or (in, out) for relu
    act: str = "silu"
    scoring: str = "softmax"      # softmax | sigmoid
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"      # max (DeepSeek-V2) | top2 (sum of the top-2 keys, DeepSeek-V3)
    bias: bool = False            # e_score_correction_bias added to the selection keys only
    norm: bool = False            # renormalise the chosen weights
    eps: float = 0.0              # added to the renormalisation denominator
    scale: float = 1.0            # routed_scaling_factor
    shared: tuple = None          # (module name, width, sigmoid-gated?)
    dense: tuple = ()             # (prefix, width) of dense MLP layers stored before layer L
    extra: str = "model.embed_tokens.weight"
    dtype: torch.dtype = torch.float32


def _swiglu(**kw):
    return dict(hidden_size=D, hidden_act="silu", vocab_size=VOCAB, **kw)


_MIXTRAL = Spec(
    "mixtral",
    _swiglu(architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=FF,
            num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=1, router_jitter_noise=0.0),
    prefix="model.layers.{L}.block_sparse_moe", projs=("w1", "w3", "w2"), norm=True)
_DSV2 = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", n_routed_experts=8,
             n_shared_experts=2, num_experts_per_tok=3, scoring_func="softmax", norm_topk_prob=False,
             moe_intermediate_size=FF, intermediate_size=20, first_k_dense_replace=1, moe_layer_freq=1,
             num_hidden_layers=2)
_DSV2_SPEC = dict(k=3, L=1, shared=("shared_experts", 2 * FF, False),
                  dense=(("model.layers.0.mlp", 20),))

SPECS = [
    _MIXTRAL,
    dataclasses.replace(_MIXTRAL, name="mixtral_bf16", dtype=torch.bfloat16),
    Spec("qwen2_moe",
         _swiglu(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=FF, shared_expert_intermediate_size=20,
                 norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=24,
                 num_hidden_layers=1),
         shared=("shared_expert", 20, True)),
    Spec("qwen3_moe",
         _swiglu(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=FF, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[], intermediate_size=24, num_hidden_layers=1),
         norm=True),
    Spec("olmoe",
         _swiglu(architectures=["OlmoeForCausalLM"], model_type="olmoe", num_experts=8,
                 num_experts_per_tok=2, intermediate_size=FF, norm_topk_prob=False, num_hidden_layers=1)),
    Spec("deepseek_v2",
         _swiglu(**_DSV2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                 routed_scaling_factor=16.0),
         n_group=4, topk_group=2, scale=16.0, **_DSV2_SPEC),
    Spec("deepseek_v2_lite",
         _swiglu(**_DSV2, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0),
         **_DSV2_SPEC),
    Spec("deepseek_v3",
         _swiglu(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", n_routed_experts=16,
                 n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                 norm_topk_prob=True, moe_intermediate_size=FF, intermediate_size=20,
                 first_k_dense_replace=1, moe_layer_freq=1, num_hidden_layers=2),
         E=16, k=4, L=1, scoring="sigmoid", n_group=4, topk_group=2, group_score="top2", bias=True,
         norm=True, eps=1e-20, scale=2.5, shared=("shared_experts", FF, False),
         dense=(("model.layers.0.mlp", 20),)),
    # HF derives encoder_sparse_step = num_layers // num_sparse_encoder_layers = 2, and block i is
    # sparse iff i % 2 == 1, so block 0 is dense and block 1 is the MoE layer.
    Spec("switch_transformers",
         dict(architectures=["SwitchTransformersForConditionalGeneration"], model_type="switch_transformers",
              d_model=D, d_ff=FF, num_experts=8, expert_capacity=8, num_layers=2, num_sparse_encoder_layers=1,
              encoder_sparse_step=2, num_decoder_layers=0, num_sparse_decoder_layers=0, decoder_sparse_step=0,
              dense_act_fn="relu", router_bias=False, router_dtype="float32", router_jitter_noise=0.0,
              is_encoder_decoder=True, vocab_size=VOCAB),
         k=1, L=1, prefix="encoder.block.{L}.layer.1.mlp", gate="router.classifier.weight",
         expert="experts.expert_{e}.{p}.weight", projs=("wi", "wo"), act="relu",
         dense=(("encoder.block.0.layer.1.mlp", FF),), extra="shared.weight"),
]


# ---------------------------------------------------------------- safetensors
_DT = {torch.float32: ("F32", "f", None), torch.float64: ("F64", "d", None),
       torch.int64: ("I64", "q", None), torch.bfloat16: ("BF16", "h", torch.int16)}


def _raw(t):
    code, fmt, view = _DT[t.dtype]
    t = t.detach().contiguous()
    a = array.array(fmt, (t.view(view) if view else t).flatten().tolist())
    if sys.byteorder != "little":
        a.byteswap()
    return code, a.tobytes()


def write_safetensors(path, tensors, metadata):
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        code, raw = _raw(tensors[name])
        header[name] = {"dtype": code, "shape": list(tensors[name].shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    h += b" " * (-(8 + len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# ---------------------------------------------------------------- the HF MoE block
def _name(s, rest, L=None):
    return s.prefix.format(L=s.L if L is None else L) + "." + rest


def _mlp(s, W, fmt, x, dt):
    """HF expert MLP: down(act(gate x) * up x) (SwiGLU) or wo(relu(wi x)) (Switch/T5)."""
    p = [W[fmt.format(p=n)].to(dt) for n in s.projs]
    if s.act == "relu":
        return F.linear(F.relu(F.linear(x, p[0])), p[1])
    return F.linear(F.silu(F.linear(x, p[0])) * F.linear(x, p[1]), p[2])


def route(s, logits, bias):
    """Returns (ids, weights, smallest decision gap). ids are in descending key order."""
    scores = logits.softmax(-1) if s.scoring == "softmax" else logits.sigmoid()
    keys = scores if bias is None else scores + bias
    gaps = []
    if s.n_group > 1:
        grouped = keys.view(len(keys), s.n_group, -1)
        gscore = grouped.max(-1).values if s.group_score == "max" else grouped.topk(2, -1).values.sum(-1)
        gs = gscore.sort(-1, descending=True).values
        gaps.append(gs[:, s.topk_group - 1] - gs[:, s.topk_group])
        keep = torch.zeros_like(gscore).scatter(1, gscore.topk(s.topk_group, -1).indices, 1.0).bool()
        keys = keys.masked_fill(~keep.repeat_interleave(s.E // s.n_group, 1), 0.0)  # as HF: dropped -> 0
    ks = keys.sort(-1, descending=True).values
    if s.k < s.E:
        gaps.append(ks[:, s.k - 1] - ks[:, s.k])
    ids = keys.topk(s.k, -1).indices
    w = scores.gather(1, ids)
    if s.norm:
        w = w / (w.sum(-1, keepdim=True) + s.eps)
    return ids, w * s.scale, min(float(g.min()) for g in gaps)


def moe_block(s, W, x, dt):
    x = x.to(dt)
    bias = W[_name(s, "gate.e_score_correction_bias")].to(dt) if s.bias else None
    ids, w, gap = route(s, F.linear(x, W[_name(s, s.gate)].to(dt)), bias)
    y = torch.zeros_like(x)
    for e in range(s.E):  # HF order: loop over experts, index_add_ weighted outputs
        tok, pos = torch.where(ids == e)
        if len(tok):
            y.index_add_(0, tok, _mlp(s, W, _name(s, s.expert.format(e=e, p="{p}")), x[tok], dt) * w[tok, pos, None])
    if s.shared:
        mod, _, gated = s.shared
        sh = _mlp(s, W, _name(s, mod + ".{p}.weight"), x, dt)
        if gated:
            sh = torch.sigmoid(F.linear(x, W[_name(s, "shared_expert_gate.weight")].to(dt))) * sh
        y = y + sh
    return y, ids, w, gap


# ---------------------------------------------------------------- data
def draw(s, g):
    W = {}

    def mlp(fmt, width):
        shapes = [(width, D)] * (len(s.projs) - 1) + [(D, width)]
        for n, shape in zip(s.projs, shapes):
            W[fmt.format(p=n)] = torch.randn(shape, generator=g) * W_STD

    W[s.extra] = torch.randn(VOCAB, D, generator=g) * W_STD
    for prefix, width in s.dense:
        mlp(prefix + ".{p}.weight", width)
    W[_name(s, s.gate)] = torch.randn(s.E, D, generator=g) * GATE_STD
    if s.bias:  # non-negative, so every selection key (sigmoid + bias) is > 0
        W[_name(s, "gate.e_score_correction_bias")] = torch.rand(s.E, generator=g) * 0.4
    for e in range(s.E):
        mlp(_name(s, s.expert.format(e=e, p="{p}")), FF)
    if s.shared:
        mlp(_name(s, s.shared[0] + ".{p}.weight"), s.shared[1])
        if s.shared[2]:
            W[_name(s, "shared_expert_gate.weight")] = torch.randn(1, D, generator=g) * W_STD
    W = {n: t.to(s.dtype) for n, t in W.items()}  # stored dtype; maths uses the exact upcast
    return W, torch.randn(T, D, generator=g)


def informative(s, W, x, ids):
    """Group limiting and the correction bias must change at least one token's selection."""
    x, logits = x.double(), F.linear(x.double(), W[_name(s, s.gate)].double())
    bias = W[_name(s, "gate.e_score_correction_bias")].double() if s.bias else None
    ok = True
    if s.n_group > 1:
        ok &= not torch.equal(route(dataclasses.replace(s, n_group=1), logits, bias)[0], ids)
    if s.bias:
        ok &= not torch.equal(route(s, logits, None)[0], ids)
    return ok


def make(s):
    # mixtral_bf16 shares mixtral's seed: same draw, then rounded to bf16 (unless a redraw is needed)
    g = torch.Generator().manual_seed(zlib.crc32(s.name.replace("_bf16", "").encode()))
    for _ in range(1000):
        W, x = draw(s, g)
        y64, ids, w64, gap = moe_block(s, W, x, torch.float64)
        if gap >= MIN_GAP and informative(s, W, x, ids):
            break
    else:
        raise RuntimeError(f"{s.name}: no decisive draw")
    y32, ids32, _, _ = moe_block(s, W, x, torch.float32)
    assert torch.equal(ids, ids32), s.name

    d = os.path.join(OUT, s.name)
    os.makedirs(d, exist_ok=True)
    cfg = dict(s.config, torch_dtype=str(s.dtype).replace("torch.", ""))
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_safetensors(os.path.join(d, "model.safetensors"), W, {"format": "pt"})
    write_safetensors(os.path.join(d, "expected.safetensors"),
                      {"x": x.double(), "ids": ids, "weights": w64, "y_f64": y64, "y_f32": y32},
                      {"layer": str(s.L), "architecture": s.name, "generator": "scripts/make_hf_fixtures.py"})
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    print(f"wrote {os.path.relpath(d, ROOT)}: layer {s.L}, E={s.E} k={s.k}, min gap {gap:.4f}, "
          f"max |y_f32 - y_f64| {float((y32.double() - y64).abs().max()):.2e}, {size} bytes")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in SPECS:
        make(spec)
