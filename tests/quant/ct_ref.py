#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""ct_ref.py : an independent reference for compressed-tensors and ModelOpt quantized bases
(test_quant_ct.c).  numpy only, no code from src/; the safetensors reader and the E4M3 table come
from quant_ref.py (the same directory).  Each format is dequantized from its definition in the
library's source (compressed-tensors forward.py _dequantize: x_q * scale, scale / global_scale
for NVFP4; ModelOpt NVFP4QTensor.dequantize: e2m1 * (weight_scale * weight_scale_2)), the merge
computed in float64, and the output checked against the library's requantization rule.

  ct_ref.py ct-fp8-keep BASE ADAPTER OUT      compressed-tensors FP8 kept quantized
  ct_ref.py ct-fp8-dtype BASE ADAPTER OUT     written as F32 (--dtype f32)
Prints one line; exit 1 on the first failure."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_ref import E4M3, adapter, e4m3_encode, fail, read_st  # noqa: E402

ULP = {"F32": 2.0 ** -23, "BF16": 2.0 ** -7, "F16": 2.0 ** -10}


def ct_args(bdir):
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


def expand(s, br, bc, shp):
    s = s.reshape(-1, s.shape[-1]) if s.ndim >= 2 else s.reshape(1, 1)
    return np.repeat(np.repeat(s.astype(np.float64), br, 0), bc, 1)[:shp[0], :shp[1]]


def check_ct_fp8(mode, bdir, adir, odir):
    qc, wargs = ct_args(bdir)
    base, _ = read_st(bdir + "/model.safetensors")
    out, _ = read_st(odir + "/model.safetensors")
    deltas = adapter(adir)
    ocfg = json.load(open(odir + "/config.json"))
    if mode == "keep" and ocfg.get("quantization_config", {}).get("quant_method") != "compressed-tensors":
        fail("quantization_config not kept")
    if mode == "dtype" and "quantization_config" in ocfg:
        fail("quantization_config kept in a dequantized output")
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
        w = (E4M3[a] * expand(s, br, bc, shp)).astype(np.float32).astype(np.float64)  # x_q * scale, in f32
        x = w + deltas[mod] if mod in deltas else w
        odt, oshp, oa, oraw = out[name]
        n_w += 1
        if mode == "dtype":
            if odt != "F32" or oshp != shp:
                fail("%s is %s %s, not F32 %s" % (name, odt, oshp, shp))
            err = np.abs(oa.astype(np.float64) - x).max()
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
                want_s = np.abs(xb).max() / 448.0  # calculate_qparams: max_val_pos / (bit_range / 2)
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


if __name__ == "__main__":
    m = sys.argv[1]
    if m == "ct-fp8-keep":
        check_ct_fp8("keep", *sys.argv[2:5])
    elif m == "ct-fp8-dtype":
        check_ct_fp8("dtype", *sys.argv[2:5])
    else:
        fail("unknown mode " + m)
