#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""mx_ref.py : an independent reference for the MXFP4 (gpt-oss) tests (test_quant_mx.c).  numpy
only, no code from src/: the dequantization of transformers' convert_moe_packed_tensors (FP4_VALUES
table, low nibble first, ldexp by scale - 127, then transpose(1, 2) to gpt-oss's [E, in, out]), the
LoRA target_parameters delta of PEFT's ParamWrapper on gpt-oss's is_transposed experts
(P[e] += (s * B[:, :, e] @ A[e])^T) in float64, and the requantization of triton_kernels'
downcast_to_mxfp_torch ported bit for bit (ROUND_UP scale, the e2m1 bit rounding with sticky
bits), after transformers' quantize_to_mxfp4 cast to bf16.

  mx_ref.py keep BASE_DIR ADAPTER_DIR OUT_DIR     kept as MXFP4 (the default)
  mx_ref.py dtype BASE_DIR ADAPTER_DIR OUT_DIR    written --dtype bf16: gate_up_proj [E, H, 2I] ...
  mx_ref.py fp8-experts keep|dtype BASE_DIR ADAPTER_DIR OUT_DIR
        block FP8 expert parameters (transformers' FP8Experts: P [E, out, in], P_scale_inv [E, out/B,
        in/B]; or one 2-D weight per expert, Qwen3-FP8), the adapter's target_parameters delta added
        as P[e] += delta_e (transformers v5 experts, not is_transposed); kept FP8 or --dtype f32
  mx_ref.py only-down ADAPTER_DIR                  keeps only the down_proj factors (in place)
  mx_ref.py zero-expert ADAPTER_DIR E             zeroes expert E's lora_B columns (in place)
  mx_ref.py edit BASE_DIR NAME drop|dtype DT|shape D0,D1..|set I0,I1.. V
        rewrites BASE_DIR/model.safetensors: tensor NAME dropped, retyped (zero bytes), reshaped
        (zero bytes) or one element set
Prints one line per check; exit 1 on the first failure."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_ref import e4m3_encode, fail, fp8_dequant, read_st, write_st  # noqa: E402  (numpy only)

FP4_VALUES = np.array([+0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
MID = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between neighbouring magnitudes


def dequant(blocks, scales):
    """[E, O, G, 16] bytes, [E, O, G] scales -> [E, O, G*32] float64 holding the f32 values"""
    lo, hi = FP4_VALUES[blocks & 15], FP4_VALUES[blocks >> 4]
    v = np.stack([lo, hi], -1).reshape(blocks.shape[:-1] + (32,))
    v = v * np.power(2.0, scales.astype(np.int64) - 127)[..., None]
    with np.errstate(over="ignore"):
        v = v.astype(np.float32).astype(np.float64)  # 6 * 2^127 does not fit an f32: inf
    v[scales == 255] = np.nan
    return v.reshape(blocks.shape[:2] + (-1,))


def to_bf16(x32):
    u = x32.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return r.view(np.float32)


def downcast(x):
    """triton_kernels downcast_to_mxfp_torch(x.to(bfloat16), uint8, axis=-1), ROUND_UP: x [..., 32k]
    float32 -> (codes [..., 16k] uint8, scales [..., k] uint8)"""
    src = to_bf16(np.ascontiguousarray(x, dtype=np.float32))
    g = src.reshape(src.shape[:-1] + (-1, 32))
    max_val = np.abs(g).max(-1, keepdims=True)
    dequant_scale = (max_val / np.float32(6.0)).astype(np.float32)
    ds_int = dequant_scale.view(np.int32).astype(np.int64)
    ds_int_rounded = ((ds_int + 0x007FFFFF) & 0x7F800000).astype(np.int32)
    dsr = ds_int_rounded.view(np.float32)
    with np.errstate(divide="ignore"):
        quant_scale = np.where(dsr == 0, np.float32(0.0), np.float32(1.0) / dsr).astype(np.float32)
    q = (g * quant_scale).astype(np.float32).reshape(src.shape)
    q_int = q.view(np.uint32).astype(np.int64)
    signs = q_int & 0x80000000
    exponents = (q_int >> 23) & 0xFF
    mantissas_orig = q_int & 0x7FFFFF
    is_sub = exponents < 127
    shift = 127 - exponents - 1
    mantissas_pre = 0x400000 | (mantissas_orig >> 1)
    bit0_dropped = (mantissas_orig & 1) != 0
    mask = (np.left_shift(1, np.minimum(np.maximum(shift, 0), 31))) - 1
    dropped_post = (mantissas_pre & mask) != 0
    sticky = is_sub & (bit0_dropped | dropped_post)
    mantissas = np.where(is_sub, mantissas_pre >> np.minimum(np.maximum(shift, 0), 63), mantissas_orig)
    exponents = np.maximum(exponents, 126) - 126
    m2bits = (mantissas >> 21) & 3
    lsb_keep = (m2bits >> 1) & 1
    guard = m2bits & 1
    sticky = sticky | ((mantissas & ((1 << 21) - 1)) != 0)
    round_inc = guard & (sticky.astype(np.int64) | lsb_keep)
    e2m1 = np.minimum((((exponents << 2) | m2bits) + round_inc) >> 1, 7)
    e2m1 = ((signs >> 28) | e2m1).astype(np.uint8)
    pairs = e2m1.reshape(e2m1.shape[:-1] + (-1, 2))
    codes = pairs[..., 0] | (pairs[..., 1] << 4)
    return codes.astype(np.uint8), (ds_int_rounded >> 23).astype(np.uint8)[..., 0]


def adapter_deltas(adir, E):
    """{param: delta [E, out, in]} of a gpt-oss target_parameters adapter (experts.base_layer =
    gate_up_proj, experts = down_proj), float64, Δ[e] = s * B[:, :, e] @ A[e]"""
    cfg = json.load(open(adir + "/adapter_config.json"))
    t, _ = read_st(adir + "/adapter_model.safetensors")
    s = cfg["lora_alpha"] / cfg["r"]
    r = cfg["r"]
    out = {}
    for name, (dt, shp, a, raw) in t.items():
        if ".lora_A." not in name:
            continue
        mod = name[len("base_model.model."):].rsplit(".lora_A.", 1)[0]
        if ".mlp.experts" not in mod:
            continue
        B = t[name.replace(".lora_A.", ".lora_B.")][2].astype(np.float64)
        A = a.astype(np.float64).reshape(E, r, -1)
        Bv = B.reshape(B.shape[0], r, E)
        layer = mod.split(".mlp.experts")[0]
        param = "gate_up_proj" if mod.endswith(".base_layer") else "down_proj"
        out[layer + ".mlp.experts." + param] = np.stack([s * Bv[:, :, e] @ A[e] for e in range(E)])
    return out


def check(mode, bdir, adir, odir):
    base, _ = read_st(bdir + "/model.safetensors")
    out, _ = read_st(odir + "/model.safetensors")
    E = json.load(open(bdir + "/config.json"))["num_local_experts"]
    deltas = adapter_deltas(adir, E)
    ocfg = json.load(open(odir + "/config.json"))
    if mode == "keep" and ocfg.get("quantization_config", {}).get("quant_method") != "mxfp4":
        fail("quantization_config not kept")
    if mode == "dtype" and "quantization_config" in ocfg:
        fail("quantization_config kept in a dequantized output")
    n_w = n_groups = n_kept = n_codes = n_near = 0
    for name, (dt, shp, a, raw) in base.items():
        if name.endswith("_scales"):
            continue
        if not name.endswith("_blocks"):
            if ".self_attn." in name and name.endswith("_proj.weight"):
                continue  # the attention projections: merged as plain bf16 LoRA, checked elsewhere
            if out[name][3] != raw:
                fail(name + ": an untouched tensor changed")
            continue
        p = name[:-len("_blocks")]
        sc = base[p + "_scales"][2]
        w = dequant(a, sc)  # [E, O, In]: the stored orientation, W[e] = P[e]^T
        d = deltas.get(p)
        x = w + d if d is not None else w
        n_w += 1
        if mode == "dtype":
            if name in out or p + "_scales" in out:
                fail(p + ": blocks/scales written in a dequantized output")
            odt, oshp, oa, _ = out[p]
            want_shape = (shp[0], shp[2] * 32, shp[1])
            if odt != "BF16" or oshp != want_shape:
                fail("%s is %s %s, not BF16 %s (gpt-oss's [E, in, out])" % (p, odt, oshp, want_shape))
            xt = np.transpose(x, (0, 2, 1))
            err = np.abs(oa.astype(np.float64) - xt)
            tol = 2.0 ** -8 * np.abs(xt) + 1e-30
            if (err > tol).any():
                k = tuple(np.argwhere(err > tol)[0])
                fail("%s%s: %.9g, want %.9g" % (p, k, oa[k], xt[k]))
            continue
        odt, oshp, oa, oraw = out[name]
        if odt != "U8" or oshp != shp:
            fail("%s is %s %s, not U8 %s" % (name, odt, oshp, shp))
        osc = out[p + "_scales"][2]
        E_, O, G = sc.shape
        xf = x.astype(np.float32)
        want_q, want_s = downcast(xf)
        want_q = want_q.reshape(a.shape)
        for e in range(E_):
            for o in range(O):
                for g in range(G):
                    n_groups += 1
                    xs, ws = x[e, o, 32 * g:32 * g + 32], w[e, o, 32 * g:32 * g + 32]
                    if np.array_equal(xs, ws, equal_nan=True):
                        if not (np.array_equal(oa[e, o, g], a[e, o, g]) and osc[e, o, g] == sc[e, o, g]):
                            fail("%s [%d, %d, group %d]: unchanged but its bytes changed" % (name, e, o, g))
                        n_kept += 1
                        continue
                    n_codes += 32
                    if osc[e, o, g] != want_s[e, o, g]:
                        fail("%s [%d, %d, group %d]: scale %d, want %d" % (name, e, o, g, osc[e, o, g],
                                                                           want_s[e, o, g]))
                    if np.array_equal(oa[e, o, g], want_q[e, o, g]):
                        continue
                    # lora-merge sums in f32, the reference in f64: only values next to a rounding
                    # boundary (e2m1 midpoint, after the bf16 step) may land on the other side
                    t = np.abs(xs) * 2.0 ** -(int(want_s[e, o, g]) - 127)
                    gc = np.stack([oa[e, o, g] & 15, oa[e, o, g] >> 4], -1).reshape(32)
                    wc = np.stack([want_q[e, o, g] & 15, want_q[e, o, g] >> 4], -1).reshape(32)
                    for i in np.nonzero(gc != wc)[0]:
                        near = np.min(np.abs(t[i] - MID)) <= 2.0 ** -7 * max(t[i], 0.25)
                        if not near or abs(int(gc[i] & 7) - int(wc[i] & 7)) != 1:
                            fail("%s [%d, %d] element %d: code %d, want %d (x = %.9g)" % (
                                name, e, o, 32 * g + i, gc[i], wc[i], xs[i]))
                        n_near += 1
    print("ok %d expert tensors, %d groups (%d kept), %d codes checked, %d near-tie differences" % (
        n_w, n_groups, n_kept, n_codes, n_near))


def fp8_block_check(name, x, w, a, sinv, oa, osinv, br, bc, counts):
    """one 2-D FP8 weight: unchanged blocks keep codes and scale, changed ones follow
    transformers' FineGrainedFP8 rule (scale_inv = amax / 448, codes RNE of x / scale_inv)"""
    o, i = x.shape
    for r0 in range(0, o, br):
        for c0 in range(0, i, bc):
            xb, b0 = x[r0:r0 + br, c0:c0 + bc], w[r0:r0 + br, c0:c0 + bc]
            s_out = osinv[r0 // br, c0 // bc]
            counts[0] += 1
            if np.array_equal(xb, b0):
                if not (np.array_equal(oa[r0:r0 + br, c0:c0 + bc], a[r0:r0 + br, c0:c0 + bc])
                        and s_out == sinv[r0 // br, c0 // bc]):
                    fail("%s block (%d,%d): unchanged but not kept" % (name, r0, c0))
                counts[1] += 1
                continue
            want_sinv = 1.0 / (448.0 / np.abs(xb).max())
            if abs(s_out - want_sinv) > 1e-5 * want_sinv:
                fail("%s block (%d,%d): scale_inv %.9g, want %.9g" % (name, r0, c0, s_out, want_sinv))
            want, tie = e4m3_encode(xb / s_out)
            bad = want != oa[r0:r0 + br, c0:c0 + bc]
            if bad.any() and (tie[bad] > 1e-3).any():
                fail("%s block (%d,%d): codes differ away from a rounding tie" % (name, r0, c0))
            counts[2] += int(bad.sum())


def check_fp8_experts(mode, bdir, adir, odir):
    base, _ = read_st(bdir + "/model.safetensors")
    out, _ = read_st(odir + "/model.safetensors")
    cfg = json.load(open(bdir + "/config.json"))
    br, bc = cfg["quantization_config"]["weight_block_size"]
    E = cfg["num_experts"]
    deltas = adapter_deltas(adir, E)  # "<layer>.mlp.experts.gate_up_proj": [E, 2I, H] ...
    n_w, counts = 0, [0, 0, 0]
    for name, (dt, shp, a, raw) in base.items():
        if dt != "F8_E4M3" or ".mlp.experts." not in name:
            continue
        sinv = base[name + "_scale_inv"][2]
        layer, rest = name.split(".mlp.experts.")
        parts = rest.split(".")
        if len(shp) == 3:  # the stack: expert by expert
            views = [(e, a[e], sinv[e], deltas.get(layer + ".mlp.experts." + rest)) for e in range(shp[0])]
        else:  # "<e>.gate_proj.weight": rows of gate_up_proj's delta (gate first, then up)
            e, proj = int(parts[0]), parts[1]
            d = deltas.get(layer + ".mlp.experts." + ("down_proj" if proj == "down_proj" else "gate_up_proj"))
            lo = shp[0] if proj == "up_proj" else 0
            views = [(None, a, sinv, None if d is None else d[e:e + 1, lo:lo + shp[0]])]
        odt, oshp, oa, _ = out[name]
        n_w += 1
        for e, ae, se, d in views:
            w = fp8_dequant(ae, se, br, bc)
            x = w + (d[0] if e is None else d[e]) if d is not None else w
            oe = oa if e is None else oa[e]
            if mode == "dtype":
                if odt != "F32" or name + "_scale_inv" in out:
                    fail(name + ": not written F32 without its scales")
                if np.abs(oe.astype(np.float64) - x).max() > 1e-6 * np.abs(x).max():
                    fail(name + ": dequantized merge differs")
                continue
            osinv = out[name + "_scale_inv"][2]
            fp8_block_check(name, x, w, ae, se, oe, osinv if e is None else osinv[e], br, bc, counts)
    if n_w == 0:
        fail("no FP8 expert tensors")
    print("ok %d FP8 expert tensors, %d blocks (%d kept), %d near-tie differences" % (n_w, *counts))


def only_down(adir):
    """the adapter without its gate_up_proj factors: target_parameters ["mlp.experts.down_proj"]"""
    t, _ = read_st(adir + "/adapter_model.safetensors")
    cfg = json.load(open(adir + "/adapter_config.json"))
    new = {n: (dt, a) for n, (dt, shp, a, raw) in t.items() if ".mlp.experts.base_layer." not in n}
    write_st(adir + "/adapter_model.safetensors", new)
    cfg["target_parameters"] = ["mlp.experts.down_proj"]
    json.dump(cfg, open(adir + "/adapter_config.json", "w"))
    print("ok")


def zero_expert(adir, e):
    t, _ = read_st(adir + "/adapter_model.safetensors")
    cfg = json.load(open(adir + "/adapter_config.json"))
    new = {}
    for name, (dt, shp, a, raw) in t.items():
        a = a.copy()
        if ".lora_B." in name and ".mlp.experts" in name:
            E = a.shape[1] // cfg["r"]
            a[:, e::E] = 0
        new[name] = (dt, a)
    write_st(adir + "/adapter_model.safetensors", new)
    print("ok")


def edit(bdir, name, op, arg=None, val=None):
    t, _ = read_st(bdir + "/model.safetensors")
    new = {}
    size = {"U8": 1, "BF16": 2, "F16": 2, "F32": 4}
    for n, (dt, shp, a, raw) in t.items():
        if n != name:
            new[n] = (dt, np.frombuffer(raw, np.uint8).reshape(-1) if dt == "BF16" else a, shp)
            continue
        if op == "drop":
            continue
        if op == "dtype":
            new[n] = (arg, np.zeros(int(np.prod(shp)) * size[arg], np.uint8), shp)
        elif op == "shape":
            shape = tuple(int(v) for v in arg.split(","))
            new[n] = (dt, np.zeros(int(np.prod(shape)) * size[dt], np.uint8), shape)
        elif op == "set":
            a = a.copy()
            a[tuple(int(v) for v in arg.split(","))] = val
            new[n] = (dt, a, shp)
    hdr = {}
    blobs, off = [], 0
    for n, (dt, a, shp) in new.items():
        raw = np.ascontiguousarray(a).tobytes()
        hdr[n] = {"dtype": dt, "shape": list(shp), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(bdir + "/model.safetensors", "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))
    print("ok")


if __name__ == "__main__":
    m = sys.argv[1]
    if m in ("keep", "dtype"):
        check(m, *sys.argv[2:5])
    elif m == "fp8-experts":
        check_fp8_experts(*sys.argv[2:6])
    elif m == "edit":
        edit(sys.argv[2], sys.argv[3], sys.argv[4], *(sys.argv[5:6] or [None]),
             *([int(sys.argv[6])] if len(sys.argv) > 6 else []))
    elif m == "only-down":
        only_down(sys.argv[2])
    elif m == "zero-expert":
        zero_expert(sys.argv[2], int(sys.argv[3]))
    else:
        fail("unknown mode " + m)
