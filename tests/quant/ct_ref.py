#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""ct_ref.py : an independent reference for compressed-tensors and ModelOpt quantized bases
(test_quant_ct.c).  numpy only, no code from src/; the safetensors reader, the E4M3 table, the FP8
dequantization and the partial adapter come from quant_ref.py (the same directory).  Each format is dequantized from its definition in the
library's source (compressed-tensors forward.py _dequantize: x_q * scale, scale / global_scale
for NVFP4; ModelOpt NVFP4QTensor.dequantize: e2m1 * (weight_scale * weight_scale_2)), the merge
computed in float64, and the output checked against the library's requantization rule.

  ct_ref.py ct-fp8-keep BASE ADAPTER OUT      compressed-tensors FP8 kept quantized
  ct_ref.py ct-fp8-dtype BASE ADAPTER OUT     written as F32, or BF16 (--dtype bf16: each value the
                                              merge rounded once, nearest even)
  ct_ref.py mo-fp8-keep|mo-fp8-dtype BASE ADAPTER OUT       ModelOpt FP8 (hf_quant_config.json,
                                              quant_algo FP8: weight x weight_scale, one F32 scale;
                                              export: (weight / (amax / 448)).to(float8_e4m3fn))
  ct_ref.py nvfp4-keep|nvfp4-dtype BASE ADAPTER OUT         compressed-tensors NVFP4
  ct_ref.py mo-nvfp4-keep|mo-nvfp4-dtype BASE ADAPTER OUT   ModelOpt NVFP4
  ct_ref.py mo-nvfp4-experts-keep|mo-nvfp4-experts-dtype BASE ADAPTER OUT
                                              ModelOpt NVFP4 expert stacks (P, P_weight_scale,
                                              P_weight_scale_2 per expert or one), target_parameters
  ct_ref.py nv-saturate BASE NAME E           expert E of stack NAME: its first group at the top of
                                              its second scale's range
  ct_ref.py partial-adapter BASE ADAPTER_DIR MODULE ROWS AMP   a LoRA touching ROWS rows of MODULE
Prints one line; exit 1 on the first failure."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_ref import E4M3, adapter, e4m3_encode, fail, fp8_dequant, partial_adapter, read_st, write_st  # noqa: E402

ULP = {"F32": 2.0 ** -23, "BF16": 2.0 ** -7, "F16": 2.0 ** -10}


def ct_args(bdir):
    if os.path.exists(bdir + "/hf_quant_config.json"):  # ModelOpt FP8: one F32 scale per tensor
        qa = json.load(open(bdir + "/hf_quant_config.json"))["quantization"]
        if qa.get("quant_algo") != "FP8":
            fail("hf_quant_config.json: quant_algo %s" % qa.get("quant_algo"))
        return None, {"strategy": "tensor"}
    qc = json.load(open(bdir + "/config.json"))["quantization_config"]
    for g in qc.get("config_groups", {}).values():
        w = g.get("weights") or {}
        if w.get("type") == "float":
            return qc, w
    fail("no float weights in config_groups")


def fp8_blocks(shp, sshape, w):
    """(block rows, block cols) of a compressed-tensors FP8 weight from its strategy"""
    o, i = shp
    st = w["strategy"]
    if st == "tensor":
        if int(np.prod(sshape)) != 1:
            fail("per-tensor scale of shape %s" % (sshape,))
        return o, i
    if st == "channel":
        return 1, i
    if st == "group":
        return 1, w["group_size"]
    if st == "block":
        return tuple(w["block_structure"])
    fail("strategy " + st)


def check_ct_fp8(mode, bdir, adir, odir):
    qc, wargs = ct_args(bdir)
    base, _ = read_st(bdir + "/model.safetensors")
    out, _ = read_st(odir + "/model.safetensors")
    deltas = adapter(adir)
    ocfg = json.load(open(odir + "/config.json"))
    hq = os.path.exists(odir + "/hf_quant_config.json")
    kept = hq if qc is None else ocfg.get("quantization_config", {}).get("quant_method") == "compressed-tensors"
    if mode == "keep" and not kept:
        fail("the quantization config was not kept")
    if mode == "dtype" and (hq or "quantization_config" in ocfg):
        fail("quantization config kept in a dequantized output")
    n_w = n_codes = n_near = n_kept = n_blocks = 0
    for name, (dt, shp, a, raw) in base.items():
        if name.endswith(".weight_scale") or name.endswith(".input_scale"):
            if mode == "dtype" and name in out:
                fail(name + " written in a dequantized output")
            continue
        mod = name[:-len(".weight")] if name.endswith(".weight") else None
        if dt != "F8_E4M3":
            same = out[name][3] == raw if mode == "keep" else np.array_equal(out[name][2].astype(np.float64),
                                                                              a.astype(np.float64))
            if not same:
                fail(name + ": an untouched tensor changed")
            continue
        sdt, sshape, s, sraw = base[name + "_scale"]
        br, bc = fp8_blocks(shp, sshape, wargs)
        w = fp8_dequant(a, s.reshape(-1, s.shape[-1]) if s.ndim >= 2 else s.reshape(1, 1), br, bc)  # x_q * scale
        x = w + deltas[mod] if mod in deltas else w
        odt, oshp, oa, oraw = out[name]
        n_w += 1
        if mode == "dtype":
            if odt not in ("F32", "BF16") or oshp != shp:
                fail("%s is %s %s, not F32 or BF16 %s" % (name, odt, oshp, shp))
            o = oa.astype(np.float64)
            if odt == "BF16":  # the merged value rounded once to 8 significant bits, nearest even
                step = np.exp2(np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** -126))) - 7)
                q = x / step  # exact (a power of two); x itself within 1e-15 of the exact merge
                want = np.round(q) * step  # numpy rounds halves to even
                bad = (o != want) & (np.abs(np.abs(q - np.floor(q)) - 0.5) > 1e-9)
                if bad.any():
                    i = np.argmax(bad)
                    fail("%s: %.9g is not %.9g rounded to BF16 (%.9g)" % (name, o.flat[i], x.flat[i], want.flat[i]))
                continue
            err = np.abs(o - x).max()
            if err > 1e-6 * np.abs(x).max():
                fail("%s: max error %.3g" % (name, err))
            continue
        if odt != "F8_E4M3":
            fail(name + " not kept F8_E4M3")
        o_sdt, o_sshape, os_, o_sraw = out[name + "_scale"]
        if o_sdt != sdt or o_sshape != sshape:
            fail("%s_scale: %s %s, want %s %s" % (name, o_sdt, o_sshape, sdt, sshape))
        if mod not in deltas:
            if oraw != raw or o_sraw != sraw:
                fail(name + ": untouched quantized weight or its scale changed")
            continue
        os2 = os_.reshape(-1, os_.shape[-1]) if os_.ndim >= 2 else os_.reshape(1, 1)
        s2 = s.reshape(-1, s.shape[-1]) if s.ndim >= 2 else s.reshape(1, 1)
        o, i = shp
        for r0 in range(0, o, br):
            for c0 in range(0, i, bc):
                xb, b0 = x[r0:r0 + br, c0:c0 + bc], w[r0:r0 + br, c0:c0 + bc]
                s_out = float(os2[r0 // br, c0 // bc])
                n_blocks += 1
                if np.array_equal(xb, b0):
                    if not (np.array_equal(oa[r0:r0 + br, c0:c0 + bc], a[r0:r0 + br, c0:c0 + bc])
                            and s_out == s2[r0 // br, c0 // bc]):
                        fail("%s block (%d,%d): unchanged but not kept" % (name, r0, c0))
                    n_kept += 1
                    continue
                # calculate_qparams: max_val_pos / (bit_range / 2); ModelOpt get_scaling_factor: amax / maxbound
                want_s = np.abs(xb).max() / 448.0
                if abs(s_out - want_s) > 0.51 * ULP[sdt] * want_s * 2 + 1e-30:
                    fail("%s block (%d,%d): scale %.9g, want amax/448 = %.9g rounded to %s" % (
                        name, r0, c0, s_out, want_s, sdt))
                want, tie = e4m3_encode(xb / s_out)  # quantize: x / scale, clamp, to fp8
                got = oa[r0:r0 + br, c0:c0 + bc]
                bad = want != got
                n_codes += xb.size
                if bad.any():
                    if (tie[bad] > 1e-3).any():
                        k = tuple(np.argwhere(bad & (tie > 1e-3))[0])
                        fail("%s block (%d,%d) element %s: code %#x, want %#x" % (name, r0, c0, k, got[k], want[k]))
                    n_near += int(bad.sum())
    print("ok %d weights, %d blocks (%d kept), %d codes checked, %d near-tie differences" % (
        n_w, n_blocks, n_kept, n_codes, n_near))


def e2m1_table():
    """value of every E2M1 code from its definition (sign bit 3, 2 exponent bits bias 1, 1 mantissa bit)"""
    v = np.zeros(16)
    for c in range(16):
        e, m = (c >> 1) & 3, c & 1
        mag = m * 0.5 if e == 0 else (1 + m / 2.0) * 2.0 ** (e - 1)
        v[c] = -mag if c & 8 else mag
    return v


E2M1 = e2m1_table()
E2M1_POS = E2M1[:8]


def e2m1_encode(y):
    """nearest code, ties to the even code, saturating at +-6; how close to a tie (0 = on it)"""
    a = np.minimum(np.abs(y), 6.0)
    hi = np.clip(np.searchsorted(E2M1_POS, a), 1, 7)
    lo = hi - 1
    dlo, dhi = a - E2M1_POS[lo], E2M1_POS[hi] - a
    code = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(a >= E2M1_POS[hi], hi, code)
    tie = np.abs(dlo - dhi) / (E2M1_POS[hi] - E2M1_POS[lo])
    return (code | np.where(np.signbit(y), 8, 0)).astype(np.uint8), tie


def unpack(p):
    r, h = p.shape
    out = np.zeros((r, 2 * h), np.uint8)
    out[:, 0::2] = p & 15
    out[:, 1::2] = p >> 4
    return out


def nv_eff(s8, g, modelopt):
    s8 = s8.astype(np.float32)
    g = np.float32(g)
    return (s8 * g if modelopt else s8 / g).astype(np.float32)


def nv_dequant(codes, s8, g, gsz, modelopt):
    eff = np.repeat(nv_eff(s8, g, modelopt), gsz, 1)
    return (E2M1[codes].astype(np.float32) * eff).astype(np.float32).astype(np.float64)


def nv_check_kept(name, x, w, codes, s8, g, amax, ocodes, os8v, og, gsz, modelopt, cnt):
    """one NVFP4 weight (or expert) kept quantized: x the merged float64 values, w the base's, amax
    the merged amax its second scale g follows; the output's codes, group scales and second scale
    og against the library's rule.  cnt: groups, kept, codes checked, near-tie differences.
    Returns 1 when the second scale was recomputed."""
    top = amax / (6 * g) if modelopt else amax / 6 * g
    recomputed = 0
    if og != g:  # recomputed by the library's rule: only when the old one no longer covers the tensor
        want = amax / 2688.0 if modelopt else 2688.0 / amax
        if top <= 448 * (1 - 1e-6) or abs(og - want) > 1e-6 * want:
            fail("%s: second scale %.9g (was %.9g), want %s" % (name, og, g, want if top > 448 else "kept"))
        recomputed = 1
    elif top > 448 * (1 + 1e-6):
        fail("%s: second scale kept though amax %.6g no longer fits it" % (name, amax))
    r, c = codes.shape
    eff = nv_eff(os8v, og, modelopt)
    for i in range(r):
        for j in range(c // gsz):
            sl = slice(j * gsz, (j + 1) * gsz)
            cnt[0] += 1
            if og == g and np.array_equal(x[i, sl], w[i, sl]):
                if not (np.array_equal(ocodes[i, sl], codes[i, sl]) and os8v[i, j] == s8[i, j]):
                    fail("%s group (%d,%d): unchanged but not kept" % (name, i, j))
                cnt[1] += 1
                continue
            ga = np.abs(x[i, sl]).max()
            target = ga / (6 * og) if modelopt else ga / 6 * og
            if modelopt:
                target = max(target, 2.0 ** -9) if target > 0 else 1.0
            if abs(os8v[i, j] - target) > target / 16 * 1.001 + 1e-12:
                fail("%s group (%d,%d): scale %.6g, want fp8(%.6g)" % (name, i, j, os8v[i, j], target))
            want, tie = e2m1_encode(x[i, sl] / eff[i, j])
            got = ocodes[i, sl]
            bad = want != got
            cnt[2] += gsz
            if bad.any():
                if (tie[bad] > 1e-3).any():
                    k = int(np.argwhere(bad & (tie > 1e-3))[0][0])
                    fail("%s group (%d,%d) element %d: code %d, want %d" % (name, i, j, k, got[k], want[k]))
                cnt[3] += int(bad.sum())
    return recomputed


def check_nvfp4_experts(mode, bdir, adir, odir):
    """ModelOpt NVFP4 expert stacks P U8 [E, O, I/2], P_weight_scale [E, O, I/16], P_weight_scale_2
    one value or one per expert ([E]: each expert's second scale follows its own merged amax), the
    adapter's target_parameters delta added as P[e] += delta_e (mx_ref.adapter_deltas); kept NVFP4
    (ModelOpt's rule, expert by expert) or --dtype f32 (P F32 [E, O, I], the scales dropped)"""
    from mx_ref import adapter_deltas
    base, _ = read_st(bdir + "/model.safetensors")
    out, _ = read_st(odir + "/model.safetensors")
    E = json.load(open(bdir + "/config.json"))["num_experts"]
    deltas = adapter_deltas(adir, E)
    n_w = n_global = n_per_expert = 0
    cnt = [0, 0, 0, 0]
    for name, (dt, shp, a, raw) in base.items():
        if dt != "U8" or len(shp) != 3 or name + "_weight_scale_2" not in base:
            continue
        s8all = E4M3[base[name + "_weight_scale"][2]]
        g2 = base[name + "_weight_scale_2"][2].reshape(-1).astype(np.float64)
        per_expert = g2.size == E
        n_per_expert += per_expert
        w = [nv_dequant(unpack(a[e]), s8all[e], g2[e if per_expert else 0], 16, True) for e in range(E)]
        d = deltas.get(name)
        x = [w[e] + d[e] if d is not None else w[e] for e in range(E)]
        n_w += 1
        if mode == "dtype":
            odt, oshp, oa, _ = out[name]
            if odt != "F32" or tuple(oshp) != (E, shp[1], 2 * shp[2]):
                fail("%s is %s %s, not F32 [E, O, I]" % (name, odt, oshp))
            for sfx in ("_weight_scale", "_weight_scale_2", "_input_scale"):
                if name + sfx in out:
                    fail(name + sfx + " written in a dequantized output")
            for e in range(E):
                err = np.abs(oa[e].astype(np.float64) - x[e]).max()
                if err > 1e-6 * np.abs(x[e]).max():
                    fail("%s expert %d: max error %.3g" % (name, e, err))
            continue
        oa = out[name][2]
        os8 = E4M3[out[name + "_weight_scale"][2]]
        og2 = out[name + "_weight_scale_2"][2].reshape(-1).astype(np.float64)
        if og2.size != g2.size:
            fail(name + ": the second scales changed shape")
        tamax = max(np.abs(xe).max() for xe in x)
        for e in range(E):
            ge = e if per_expert else 0
            n_global += nv_check_kept("%s[%d]" % (name, e), x[e], w[e], unpack(a[e]), s8all[e], g2[ge],
                                      np.abs(x[e]).max() if per_expert else tamax, unpack(oa[e]), os8[e],
                                      og2[ge], 16, True, cnt)
    if n_w == 0 or n_per_expert == 0:
        fail("no NVFP4 expert stacks with per-expert second scales")
    print("ok %d NVFP4 expert stacks (%d with per-expert second scales), %d groups (%d kept), %d codes checked, "
          "%d near-tie differences, %d second scales recomputed" % (n_w, n_per_expert, *cnt, n_global))


def nv_saturate(bdir, name, e):
    """expert e of the NVFP4 stack NAME: its first group (row 0) all code 6.0 with group scale 448,
    so that its amax is the largest its second scale covers and a positive delta there needs a
    new second scale (rewrites BASE/model.safetensors in place)"""
    t, _ = read_st(bdir + "/model.safetensors")
    new = {}
    for n, (dt, shp, a, raw) in t.items():
        a = (np.frombuffer(raw, np.uint16).reshape(shp) if dt == "BF16" else a).copy()
        if n == name:
            if dt != "U8" or len(shp) != 3:
                fail("%s is %s %s, not an NVFP4 expert stack (a gen_model older than its --quant "
                     "modelopt-nvfp4 --fused-experts?)" % (name, dt, list(shp)))
            a[e, 0, :8] = 0x77
        elif n == name + "_weight_scale":
            a[e, 0, 0] = 0x7E
        new[n] = (dt, a)
    write_st(bdir + "/model.safetensors", new)
    print("ok")


def check_nvfp4(mode, bdir, adir, odir, modelopt):
    base, _ = read_st(bdir + "/model.safetensors")
    out, _ = read_st(odir + "/model.safetensors")
    deltas = adapter(adir)
    ocfg = json.load(open(odir + "/config.json"))
    hq = os.path.exists(odir + "/hf_quant_config.json")
    quant_kept = hq if modelopt else ocfg.get("quantization_config", {}).get("quant_method") == "compressed-tensors"
    if mode == "keep" and not quant_kept:
        fail("the quantization config was not kept")
    if mode == "dtype" and (hq or "quantization_config" in ocfg):
        fail("quantization config kept in a dequantized output")
    wsfx, gsfx = (".weight", ".weight_scale_2") if modelopt else (".weight_packed", ".weight_global_scale")
    n_w = n_global = 0
    cnt = [0, 0, 0, 0]  # groups, kept, codes checked, near-tie differences
    for name, (dt, shp, a, raw) in base.items():
        if name.endswith(".weight_scale") or name.endswith(gsfx) or name.endswith(".input_scale"):
            if mode == "dtype" and name in out:
                fail(name + " written in a dequantized output")
            continue
        if not (name.endswith(wsfx) and dt == "U8"):
            same = out[name][3] == raw if mode == "keep" else np.array_equal(out[name][2].astype(np.float64),
                                                                              a.astype(np.float64))
            if not same:
                fail(name + ": an untouched tensor changed")
            continue
        stem = name[:-len(wsfx)]
        mod = stem
        s8 = E4M3[base[stem + ".weight_scale"][2]]
        g = float(base[stem + gsfx][2].reshape(-1)[0])
        codes = unpack(a)
        gsz = codes.shape[1] // s8.shape[1]
        w = nv_dequant(codes, s8, g, gsz, modelopt)
        x = w + deltas[mod] if mod in deltas else w
        n_w += 1
        if mode == "dtype":
            odt, oshp, oa, _ = out[stem + ".weight"]
            if odt != "F32" or oshp != codes.shape:
                fail("%s.weight is %s %s, not F32 %s" % (stem, odt, oshp, codes.shape))
            if not modelopt and name in out:
                fail(name + " written in a dequantized output")
            err = np.abs(oa.astype(np.float64) - x).max()
            if err > 1e-6 * np.abs(x).max():
                fail("%s: max error %.3g" % (name, err))
            continue
        odt, oshp, oa, oraw = out[name]
        os8 = out[stem + ".weight_scale"]
        og = float(out[stem + gsfx][2].reshape(-1)[0])
        if odt != "U8" or oshp != shp or os8[0] != "F8_E4M3":
            fail(name + " not kept packed")
        if mod not in deltas:
            if oraw != raw or os8[3] != base[stem + ".weight_scale"][3] or og != g:
                fail(name + ": untouched quantized weight or its scales changed")
            continue
        n_global += nv_check_kept(name, x, w, codes, s8, g, np.abs(x).max(), unpack(oa), E4M3[os8[2]], og, gsz,
                                  modelopt, cnt)
    print("ok %d weights, %d groups (%d kept), %d codes checked, %d near-tie differences, %d second scales "
          "recomputed" % (n_w, *cnt, n_global))


if __name__ == "__main__":
    m = sys.argv[1]
    if m in ("ct-fp8-keep", "mo-fp8-keep"):
        check_ct_fp8("keep", *sys.argv[2:5])
    elif m in ("ct-fp8-dtype", "mo-fp8-dtype"):
        check_ct_fp8("dtype", *sys.argv[2:5])
    elif m in ("nvfp4-keep", "nvfp4-dtype", "mo-nvfp4-keep", "mo-nvfp4-dtype"):
        check_nvfp4(m.rsplit("-", 1)[1], *sys.argv[2:5], modelopt=m.startswith("mo-"))
    elif m in ("mo-nvfp4-experts-keep", "mo-nvfp4-experts-dtype"):
        check_nvfp4_experts(m.rsplit("-", 1)[1], *sys.argv[2:5])
    elif m == "nv-saturate":
        nv_saturate(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif m == "partial-adapter":
        partial_adapter(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
    else:
        fail("unknown mode " + m)
