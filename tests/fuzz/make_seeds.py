#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets: tests/fuzz/corpus/<target>/<name>.

Each seed spells out the leading bytes of one case in the layout the target reads (see ByteReader in
fuzz_support.hpp and each target's LLVMFuzzerTestOneInput); the target generates the rest of the values from a
hash of the input. Seeds cover every router kind and option family, the value families (moderate, ties,
NaN/±inf/denormal/±FLT_MAX), the edge shapes (T = 0, T = 1, E = 1, k = E, widths around the SIMD registers),
and the rejections (NaN in x, out-of-range ids). Other files in the corpus directories (reproducers of fixed
bugs) are left alone. Rerun after changing a target's byte layout:
    python3 tests/fuzz/make_seeds.py
"""

import os

HERE = os.path.dirname(os.path.abspath(__file__))

# ByteReader::special_float codes.
NAN, INF, NINF, FMAX, NFMAX, DENORM, BIG, EXP_OVER, ZERO, ONE = 24, 32, 40, 12, 13, 8, 14, 16, 0, 2
SPECIALS = [NAN, INF, NINF, FMAX, NFMAX, DENORM, BIG, EXP_OVER, ZERO, ONE]

# ByteReader::fill modes.
GENERATED, EACH_SPECIAL, INJECT, SMALL_INTS, ALL_EQUAL = 0, 2, 3, 5, 6


def fill_special(n, codes=SPECIALS):
    return bytes([EACH_SPECIAL] + [codes[i % len(codes)] for i in range(n)])


def write(target, name, data):
    path = os.path.join(HERE, "corpus", target)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, name), "wb") as f:
        f.write(bytes(data))


# ------------------------------------------------------------------------------------------------------------
# fuzz_router: kind, T (% 65), E (1 + % 64), k (1 + % E), d (1 + % 8), logits mode (< 64), then the kind's options.

KINDS = ["top_k", "top_k_softmax", "capacity", "null_experts", "dense_to_sparse", "expert_choice", "sequence_level",
         "gating_residual", "with_losses", "null_experts_with_losses", "capacity_with_losses"]


def header(kind, T, E, k, d, logits=False):
    return bytes([KINDS.index(kind), T, E - 1, k - 1, d - 1, 0 if logits else 200])


def top_k_options(score=0, flags=2, groups=None, scale=0, temperature=0, jitter=0):
    """score 0 softmax / 1 sigmoid / 2 sqrt-softplus; flags: 1 softmax after top-k, 2 renormalise, 4 bias,
    8 Gumbel, 16 training, 32 groups; scale/temperature/jitter: table indices."""
    out = [score, flags | (32 if groups else 0)]
    if groups:
        out += list(groups)  # divisor index, top_k_groups, group_score_top (raw bytes)
    return bytes(out + [scale, temperature, jitter, 7, 3])


# NullExpertRouter: m null experts (% 9), k (1 + % (E + m)), separate projection (flag).
NULL_OPTIONS = bytes([4, 1, 1])
# DenseToSparseGate: threshold, max/min temperature (table indices), decay, decay_steps (4 bytes), never hard
# (flag 1) or hard from step (flag 0 + 4 bytes), gumbel gates (flag), seed, training (flag), step (4 bytes).
D2S_SOFT = bytes([0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 5, 1, 0, 0, 0, 10])
D2S_HARD = bytes([0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 5, 0, 5, 1, 0, 0, 0, 10])
D2S_GUMBEL_GATES = bytes([2, 0, 1, 2, 0, 0, 1, 0, 1, 1, 5, 1, 0, 0, 0, 10])
D2S_EVAL = bytes([0, 0, 1, 1, 0, 0, 1, 0, 1, 0, 5, 0, 0, 0, 0, 10])


def router_seeds():
    T, E, k, d = 16, 8, 2, 4
    gen = bytes([GENERATED])
    finite_x = bytes([200, GENERATED])       # x: no non-finite values allowed, generated
    seeds = {}
    for kind in KINDS:
        h = header(kind, T, E, k, d)
        if kind in ("top_k", "top_k_softmax", "sequence_level", "gating_residual", "with_losses", "capacity",
                    "capacity_with_losses"):
            opts = top_k_options()
            if kind == "top_k_softmax":
                opts += bytes([1])
            if kind in ("capacity", "capacity_with_losses"):
                opts += bytes([1, 0])  # factor 1.25, probability
        elif kind in ("null_experts", "null_experts_with_losses"):
            opts = NULL_OPTIONS
        elif kind == "dense_to_sparse":
            opts = D2S_SOFT
        else:  # expert_choice
            opts = bytes([0])
        # Fills after the gate's: the null projection (separate), GatingResidual's map.
        more = {"null_experts": gen, "gating_residual": gen, "null_experts_with_losses": bytes([1, GENERATED])}.get(kind, b"")
        seeds[kind + "_moderate"] = h + opts + gen + more + finite_x
        seeds[kind + "_ties"] = h + opts + bytes([SMALL_INTS]) + more + bytes([200, SMALL_INTS])
        seeds[kind + "_special_gate"] = h + opts + fill_special(E * d) + more + finite_x
        seeds[kind + "_nan_gate"] = h + opts + bytes([ALL_EQUAL, NAN]) + more + finite_x
        seeds[kind + "_special_x"] = h + opts + gen + more + bytes([0]) + fill_special(T * d)
    # DenseToSparseGate phases.
    for name, opts in {"d2s_hard": D2S_HARD, "d2s_gumbel_gates": D2S_GUMBEL_GATES, "d2s_evaluation": D2S_EVAL}.items():
        seeds[name] = header("dense_to_sparse", T, E, k, d) + opts + gen + finite_x
        seeds[name + "_special"] = header("dense_to_sparse", T, E, k, d) + opts + fill_special(E * d) + finite_x
    # Option families of TopKRouter.
    for name, opts in {
        "sigmoid": top_k_options(score=1),
        "sigmoid_unnormalised": top_k_options(score=1, flags=0),
        "sqrt_softplus": top_k_options(score=2),
        "sqrt_softplus_unnormalised": top_k_options(score=2, flags=0),
        "softmax_after_top_k": top_k_options(flags=1),
        "unnormalised_scaled": top_k_options(flags=0, scale=4),
        "bias": top_k_options(flags=2 | 4),
        "groups": top_k_options(flags=2, groups=(2, 1, 1)),
        "deepseek_v3": top_k_options(score=1, flags=2 | 4, groups=(3, 1, 1), scale=3),
        "gumbel_training": top_k_options(flags=2 | 8 | 16, jitter=3),
        "cold": top_k_options(temperature=5),
        "hot": top_k_options(temperature=6),
        "invalid_temperature": top_k_options(temperature=8),
    }.items():
        seeds["top_k_" + name] = header("top_k", T, E, k, d) + opts + gen + bytes([200, GENERATED])
        if name in ("sigmoid", "sqrt_softplus_unnormalised", "softmax_after_top_k", "bias", "groups"):
            seeds["top_k_" + name + "_special"] = header("top_k", T, E, k, d) + opts + fill_special(E * d) + finite_x
    # Logits given directly, every value special.
    for kind in ("top_k", "null_experts", "dense_to_sparse"):
        h = header(kind, T, E, k, d, logits=True)
        opts = {"top_k": top_k_options(), "null_experts": NULL_OPTIONS, "dense_to_sparse": D2S_SOFT}[kind]
        more = gen if kind == "null_experts" else b""
        width = E + 4 if kind == "null_experts" else E
        seeds[kind + "_logits_special"] = h + opts + gen + more + fill_special(T * width)
    # Shapes.
    opts = top_k_options()
    seeds["empty_batch"] = header("top_k", 0, E, k, d) + opts + gen + finite_x
    seeds["one_token_one_expert"] = header("top_k", 1, 1, 1, 1) + opts + gen + finite_x
    seeds["k_equals_e_64"] = header("top_k", 64, 64, 64, 8) + opts + gen + finite_x
    seeds["capacity_tiny"] = header("capacity", 64, 8, 2, 4) + opts + bytes([4, 1]) + gen + finite_x
    seeds["capacity_position"] = header("capacity", 33, 5, 3, 3) + opts + bytes([3, 1]) + gen + finite_x
    seeds["expert_choice_huge_factor"] = header("expert_choice", 17, 7, 1, 2) + bytes([5]) + gen + finite_x
    seeds["expert_choice_tiny_factor"] = header("expert_choice", 64, 64, 1, 2) + bytes([3]) + gen + finite_x
    seeds["null_experts_many_nulls"] = header("null_experts", 16, 2, 1, 3) + bytes([8, 9, 0]) + gen + finite_x
    for name, data in seeds.items():
        write("fuzz_router", name, data)


# ------------------------------------------------------------------------------------------------------------
# fuzz_dispatch: T (% 65), E (1 + % 64), k (1 + % 16), mode (1 capacity, 2 two banks, 4 token-indexed banks)
# [split], then per slot
# an id code (< 150 valid: next byte % E; < 180 duplicate: next byte; < 200 -1; < 210 other negative: 4 bytes;
# < 215 INT64_MIN; < 235 just out of range: next byte; < 240 INT64_MAX) and a weight code (< 8: 0; else ±2^-(c % 11)).

def dispatch(T, E, k, mode, slots, split=None, tail=b""):
    out = [T, E - 1, k - 1, mode]
    if split is not None:
        out.append(split)
    for id_code, weight in slots:
        out += list(id_code) + [weight]
    return bytes(out) + tail


def valid(e):
    return bytes([0, e])


def dispatch_seeds():
    seeds = {}
    T, E, k = 8, 6, 2
    n = T * k
    seeds["valid"] = dispatch(T, E, k, 0, [(valid(i % E), 8 + i % 11) for i in range(n)])
    seeds["valid_two_banks"] = dispatch(T, E, k, 2 | 4, [(valid((i * 5) % E), 9) for i in range(n)], split=2)
    seeds["all_one_expert"] = dispatch(T, E, k, 0, [(valid(3), 8) for _ in range(n)])
    seeds["duplicates"] = dispatch(T, E, k, 0, [(valid(1), 8) if i % 2 == 0 else (bytes([160, 0]), 9) for i in range(n)])
    seeds["unused"] = dispatch(T, E, k, 4, [(bytes([190]), 8) if i % 3 else (valid(i % E), 10) for i in range(n)])
    seeds["negatives"] = dispatch(T, E, k, 0, [(bytes([205, 0, 0, 1, 2]), 8) if i % 2 else (bytes([212]), 8)
                                               for i in range(n)])
    seeds["out_of_range"] = dispatch(T, E, k, 0, [(valid(0), 8)] * (n - 1) + [(bytes([220, 0]), 8)])
    seeds["out_of_range_huge"] = dispatch(T, E, k, 0, [(bytes([238]), 8)] + [(valid(1), 8)] * (n - 1))
    seeds["negative_weights"] = dispatch(T, E, k, 0, [(valid(i % E), 230 + i % 20) for i in range(n)])
    seeds["zero_weights"] = dispatch(T, E, k, 0, [(valid(i % E), 0) for i in range(n)])
    for policy in (0, 1):
        for factor in (3, 5):
            seeds[f"capacity_{factor}_{policy}"] = dispatch(
                16, 4, 2, 1, [(valid(i % 2), 8 + i % 11) for i in range(32)], tail=bytes([0] * 3 + [factor, policy]))
    seeds["capacity_two_banks_unused"] = dispatch(T, E, k, 3 | 4, [(bytes([190]), 8) if i % 4 == 0 else (valid(i % E), 9)
                                                               for i in range(n)], split=3, tail=bytes([0, 4, 0]))
    seeds["empty_batch"] = dispatch(0, E, k, 0, [])
    seeds["one_token_one_expert"] = dispatch(1, 1, 1, 0, [(valid(0), 8)])
    seeds["k16"] = dispatch(4, 64, 16, 2, [(valid(i * 7 % 64), 8 + i % 11) for i in range(64)], split=40)
    seeds["t64_e64"] = dispatch(64, 64, 1, 4, [(valid(i), 8 + i % 11) for i in range(64)])
    for name, data in seeds.items():
        write("fuzz_dispatch", name, data)


# ------------------------------------------------------------------------------------------------------------
# fuzz_simd_diff: T (% 13), E (1 + % 40), k (1 + % min(E, 20)), d (1 + % 20), d_ff (1 + % 20), flags (1 gated, 2 ReLU,
# 4 bias, 8 renormalise, 16 softmax after top-k), temperature index, then one fill-mode byte per parameter
# (% 4: 0 small integers, 1 quarters, else generated), x and dy (mode byte, then a byte < 20 puts NaN / ±inf).

def simd(T, E, k, d, d_ff, flags, temperature=0, modes=(2,) * 9, bad=None):
    out = bytes([T, E - 1, k - 1, d - 1, d_ff - 1, flags, temperature]) + bytes(modes)
    if bad is not None:
        out += bytes([bad])
    return out


def simd_seeds():
    seeds = {}
    for flags in range(32):
        d = [1, 7, 8, 9, 15, 16, 17, 20][flags % 8]
        d_ff = [20, 17, 16, 9, 8, 3, 1, 12][flags % 8]
        seeds[f"flags{flags:02d}_d{d}_dff{d_ff}"] = simd(6, 4, 2, d, d_ff, flags, temperature=flags % 4)
    seeds["ties_small_ints"] = simd(12, 8, 3, 16, 16, 1 | 8, modes=(0,) * 9)
    seeds["quarters"] = simd(12, 8, 7, 17, 9, 1 | 4 | 8, modes=(1,) * 9)
    seeds["k_equals_e"] = simd(12, 8, 8, 20, 20, 1 | 8)
    # Router rows around the register widths (8 AVX2, 16 AVX-512 floats).
    for E in (7, 8, 9, 15, 16, 17, 32, 33, 40):
        seeds[f"experts{E}"] = simd(8, E, 2 + E % 3, 9, 5, 1 | (8 if E % 2 else 0), temperature=E % 4)
    seeds["softmax_after_top_k_k17"] = simd(6, 33, 17, 4, 4, 1 | 16)
    seeds["softmax_after_top_k_k20_ties"] = simd(6, 40, 20, 4, 4, 16, modes=(0,) * 9)
    seeds["one_expert"] = simd(5, 1, 1, 16, 16, 1)
    seeds["one_token"] = simd(1, 8, 2, 9, 9, 1 | 2 | 8)
    seeds["empty_batch"] = simd(0, 4, 2, 8, 8, 1 | 8)
    # Gated without bias: 4 parameters (w1, w2, w3, gate), then x's mode, a byte < 20, the position, the value.
    seeds["nan_in_x"] = simd(6, 4, 2, 8, 8, 1 | 8, modes=(2,) * 5 + (0, 3, 0))
    seeds["inf_in_dy"] = simd(6, 4, 2, 8, 8, 1 | 8, modes=(2,) * 5 + (200, 2, 0, 5, 1))
    for name, data in seeds.items():
        write("fuzz_simd_diff", name, data)


if __name__ == "__main__":
    router_seeds()
    dispatch_seeds()
    simd_seeds()
