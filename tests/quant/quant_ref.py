#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""quant_ref.py : an independent reference for the quantized-base tests (test_quant.c).  Reads
safetensors with numpy only (no code from src/), dequantizes each format from its definition,
computes the merge in float64 and checks lora-merge's output.

  quant_ref.py fp8-keep BASE_DIR ADAPTER_DIR OUT_DIR     block FP8 kept quantized
  quant_ref.py fp8-dtype BASE_DIR ADAPTER_DIR OUT_DIR    block FP8 written as F32 (--dtype f32)
  quant_ref.py fp8-summary BASE_DIR ADAPTER_DIR OUT_DIR CHANGED ELEMS ERR_MAX
        the text report's requantization summary: CHANGED of the ELEMS elements of the adapted
        weights changed (code x scale), error up to ERR_MAX of the block amax (|Q - x| / amax of
        the exact merged block x, over the changed blocks; printed to 3 digits)
  quant_ref.py partial-adapter BASE_DIR ADAPTER_DIR MODULE ROWS [AMP]
        writes a LoRA adapter touching only the first ROWS output rows of MODULE (q_proj), lora_B
        values of about AMP (default 0.05)
Prints one line per check; exit 1 on the first failure."""
import json
import struct
import sys

import numpy as np

DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "U8": np.uint8, "I8": np.int8,
      "F8_E4M3": np.uint8, "I32": np.int32, "I64": np.int64}


def read_st(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    hdr = json.loads(buf[8:8 + n])
    meta = hdr.pop("__metadata__", None)
    out = {}
    for name, t in hdr.items():
        b, e = t["data_offsets"]
        raw = buf[8 + n + b:8 + n + e]
        if t["dtype"] == "BF16":
            a = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=DT[t["dtype"]])
        out[name] = (t["dtype"], tuple(t["shape"]), a.reshape(t["shape"]) if t["shape"] else a, raw)
    return out, meta


def write_st(path, tensors):
    hdr, blobs, off = {}, [], 0
    for name, (dt, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        hdr[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def e4m3_table():
    """value of every E4M3FN code, from the format's definition (bias 7, no inf, S.1111.111 NaN)"""
    v = np.zeros(256)
    for c in range(256):
        s = -1.0 if c & 0x80 else 1.0
        e, m = (c >> 3) & 15, c & 7
        if e == 15 and m == 7:
            v[c] = np.nan
        elif e == 0:
            v[c] = s * m * 2.0 ** -9
        else:
            v[c] = s * (1 + m / 8.0) * 2.0 ** (e - 7)
    return v


E4M3 = e4m3_table()
POS = E4M3[:0x7F]  # codes 0 .. 0x7E: 0 .. 448, increasing


def e4m3_encode(y):
    """nearest code, ties to the even code, saturating at +-448 (torch clamp + .to(float8_e4m3fn));
    also returns how close each value was to a tie (0 = on it), in units of the local step"""
    a = np.minimum(np.abs(y), 448.0)
    hi = np.clip(np.searchsorted(POS, a), 1, 0x7E)
    lo = hi - 1
    dlo, dhi = a - POS[lo], POS[hi] - a
    code = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    code = np.where(a >= POS[hi], hi, code)
    tie = np.abs(dlo - dhi) / (POS[hi] - POS[lo])
    return (code | np.where(np.signbit(y), 0x80, 0)).astype(np.uint8), tie


def fail(msg):
    print("FAIL " + msg)
    sys.exit(1)


def lora_factors(adir):
    """a LoRA adapter's scale and {module: {"A": lora_A, "B": lora_B}} in f64"""
    cfg = json.load(open(adir + "/adapter_config.json"))
    t, _ = read_st(adir + "/adapter_model.safetensors")
    mods = {}
    for name, (dt, shp, a, raw) in t.items():
        mod = name[len("base_model.model."):].rsplit(".lora_", 1)[0]
        mods.setdefault(mod, {})["A" if ".lora_A." in name else "B"] = a.astype(np.float64)
    return cfg["lora_alpha"] / cfg["r"], mods


def adapter(adir):
    """{module: scale * B @ A} in f64"""
    scale, mods = lora_factors(adir)
    return {m: scale * (v["B"] @ v["A"]) for m, v in mods.items()}


def fp8_dequant(codes, sinv, br, bc):
    o, i = codes.shape
    s = np.repeat(np.repeat(sinv.astype(np.float64), br, 0), bc, 1)[:o, :i]
    return (E4M3[codes] * s).astype(np.float32).astype(np.float64)  # the product, rounded once to f32


def block_size(base_dir):
    qc = json.load(open(base_dir + "/config.json"))["quantization_config"]
    return qc["weight_block_size"]


def check_fp8(mode, bdir, adir, odir):
    br, bc = block_size(bdir)
    base, _ = read_st(bdir + "/model.safetensors")
    out, _ = read_st(odir + "/model.safetensors")
    deltas = adapter(adir)
    ocfg = json.load(open(odir + "/config.json"))
    if mode == "keep" and ocfg.get("quantization_config", {}).get("quant_method") != "fp8":
        fail("quantization_config not kept")
    if mode == "dtype" and "quantization_config" in ocfg:
        fail("quantization_config kept in a dequantized output")
    n_w = n_codes = n_near = n_kept = n_blocks = 0
    for name, (dt, shp, a, raw) in base.items():
        if name.endswith("_scale_inv"):
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
        sinv = base[name + "_scale_inv"][2]
        w = fp8_dequant(a, sinv, br, bc)
        x = w + deltas[mod] if mod in deltas else w
        odt, oshp, oa, oraw = out[name]
        n_w += 1
        if mode == "dtype":
            if odt != "F32" or oshp != shp:
                fail("%s is %s %s, not F32 %s" % (name, odt, oshp, shp))
            tol = 1e-6 * np.abs(x).max()
            err = np.abs(oa.astype(np.float64) - x).max()
            if err > tol:
                fail("%s: max error %.3g > %.3g" % (name, err, tol))
            continue
        if odt != "F8_E4M3":
            fail(name + " not kept F8_E4M3")
        osinv = out[name + "_scale_inv"][2].astype(np.float64)
        if mod not in deltas:
            if oraw != raw or out[name + "_scale_inv"][3] != base[name + "_scale_inv"][3]:
                fail(name + ": untouched quantized weight or its scales changed")
            continue
        o, i = shp
        for r0 in range(0, o, br):
            for c0 in range(0, i, bc):
                xb = x[r0:r0 + br, c0:c0 + bc]
                n_blocks += 1
                b0 = w[r0:r0 + br, c0:c0 + bc]
                s_out = osinv[r0 // br, c0 // bc]
                if np.array_equal(xb, b0):  # unchanged block: identical codes and scale
                    if not (np.array_equal(oa[r0:r0 + br, c0:c0 + bc], a[r0:r0 + br, c0:c0 + bc])
                            and s_out == sinv[r0 // br, c0 // bc]):
                        fail("%s block (%d,%d): unchanged but not kept" % (name, r0, c0))
                    n_kept += 1
                    continue
                amax = np.abs(xb).max()
                want_sinv = 1.0 / (448.0 / amax)
                if abs(s_out - want_sinv) > 1e-5 * want_sinv:
                    fail("%s block (%d,%d): scale_inv %.9g, want amax/448 = %.9g" % (name, r0, c0, s_out, want_sinv))
                want, tie = e4m3_encode(xb / s_out)
                got = oa[r0:r0 + br, c0:c0 + bc]
                bad = want != got
                n_codes += xb.size
                if bad.any():
                    # the merged value is rounded to f32 before quantizing: only near-ties may differ
                    if (tie[bad] > 1e-3).any():
                        k = np.argwhere(bad & (tie > 1e-3))[0]
                        fail("%s block (%d,%d) element %s: code %#x, want %#x (x = %.9g)" % (
                            name, r0, c0, tuple(k), got[tuple(k)], want[tuple(k)], xb[tuple(k)]))
                    n_near += int(bad.sum())
    print("ok %d weights, %d blocks (%d kept), %d codes checked, %d near-tie differences" % (
        n_w, n_blocks, n_kept, n_codes, n_near))


def fp8_summary(bdir, adir, odir, changed, elems, err_max):
    br, bc = block_size(bdir)
    base, _ = read_st(bdir + "/model.safetensors")
    out, _ = read_st(odir + "/model.safetensors")
    deltas = adapter(adir)
    n_changed = n_elems = 0
    emax = 0.0
    for name, (dt, shp, a, raw) in base.items():
        mod = name[:-len(".weight")] if name.endswith(".weight") else None
        if dt != "F8_E4M3" or mod not in deltas:
            continue
        w = fp8_dequant(a, base[name + "_scale_inv"][2], br, bc)
        x = w + deltas[mod]
        q = fp8_dequant(out[name][2], out[name + "_scale_inv"][2], br, bc)
        n_changed += int((q != w).sum())
        n_elems += q.size
        for r0 in range(0, shp[0], br):
            for c0 in range(0, shp[1], bc):
                xb, qb = x[r0:r0 + br, c0:c0 + bc], q[r0:r0 + br, c0:c0 + bc]
                if not np.array_equal(qb, w[r0:r0 + br, c0:c0 + bc]):
                    emax = max(emax, np.abs(qb - xb).max() / np.abs(xb).max())
    if (n_changed, n_elems) != (changed, elems):
        fail("report: %d of %d elements changed, want %d of %d" % (changed, elems, n_changed, n_elems))
    if abs(err_max - emax) > 5e-3 * emax:
        fail("report: error up to %.6g of the block amax, want %.6g" % (err_max, emax))
    print("ok %d of %d elements changed, error up to %.6g of the block amax" % (n_changed, n_elems, emax))


def partial_adapter(bdir, adir, module, rows, amp):
    """a LoRA adapter touching the first ROWS output rows of module (its weight stored as
    .weight, or packed as .weight_packed / a U8 .weight: two values a byte)"""
    base, _ = read_st(bdir + "/model.safetensors")
    dt, shp, _, _ = base[module + ".weight"] if module + ".weight" in base else base[module + ".weight_packed"]
    o, i = shp[0], shp[1] * (2 if dt == "U8" else 1)
    rng = np.random.default_rng(7)
    A = (rng.standard_normal((4, i)) * 0.1).astype(np.float32)
    B = np.zeros((o, 4), np.float32)
    B[:rows] = rng.standard_normal((rows, 4)).astype(np.float32) * amp
    pre = "base_model.model." + module
    write_st(adir + "/adapter_model.safetensors", {pre + ".lora_A.weight": ("F32", A),
                                                   pre + ".lora_B.weight": ("F32", B)})
    with open(adir + "/adapter_config.json", "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [module.rsplit(".", 1)[1]],
                   "lora_dropout": 0.0, "bias": "none"}, f)
    print("ok")


if __name__ == "__main__":
    m = sys.argv[1]
    if m == "fp8-keep":
        check_fp8("keep", *sys.argv[2:5])
    elif m == "fp8-dtype":
        check_fp8("dtype", *sys.argv[2:5])
    elif m == "fp8-summary":
        fp8_summary(*sys.argv[2:5], int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))
    elif m == "partial-adapter":
        partial_adapter(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]),
                        float(sys.argv[6]) if len(sys.argv) > 6 else 0.05)
    else:
        fail("unknown mode " + m)
