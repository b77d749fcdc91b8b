#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""bnb_ref.py : an independent reference for the bitsandbytes tests (test_quant_bnb.c).  Reads
safetensors with numpy only (no code from src/), dequantizes bitsandbytes' 4-bit and 8-bit
weights from the library's definitions (bitsandbytes functional.py / kernels.cu, restated here),
computes the merge in float64 and checks lora-merge's output.

  bnb_ref.py dequant BASE_DIR ADAPTER_DIR OUT_DIR DTYPE   a bitsandbytes base merged, written as
        DTYPE (BF16/F16/F32): every quantized weight dequantized (changed ones merged), quant-state
        tensors gone, quantization_config removed, every other tensor identical
  bnb_ref.py simulate BASE_DIR ADAPTER_DIR OUT_DIR        --simulate-nf4: each merged weight of the
        16-bit base first through NF4 quantize/dequantize (blocks of 64), then merged
  bnb_ref.py simulate-double BASE_DIR ADAPTER_DIR OUT_DIR --simulate-nf4=double: the same with the
        absmax double-quantized (quantize_4bit compress_statistics: the mean offset, the 8-bit
        dynamic map in blocks of 256, dQuantize as kernels.cu writes it)
  bnb_ref.py tables                                       prints the NF4 and FP4 tables as f32 bits
Prints one line per check; exit 1 on the first failure."""
import json
import math
import os
from fractions import Fraction
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quant_ref  # noqa: E402  (numpy only: the safetensors reader, the LoRA factors)
from quant_ref import fail, lora_factors  # noqa: E402

F32 = np.float32

# functional.py get_4bit_type("nf4"): the data list, as torch.tensor() stores it (f32), divided by
# its absolute maximum (1.0)
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=F32)
# get_4bit_type("fp4"): [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...] divided (in f32) by 12
FP4 = (np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                dtype=F32) / F32(12.0)).astype(F32)
# kernels.cu dQuantizeNF4: the decision thresholds (x above a threshold takes the upper code)
# float literals there, so each decimal is rounded ONCE to f32 (through a double, -0.8480964004993439
# comes out one ulp off): f32_of_decimal
def f32_of_decimal(text):
    """the f32 nearest to the decimal text (ties to even), exactly"""
    want = Fraction(text)
    c = F32(float(want))
    cands = [np.nextafter(c, F32(-np.inf)), c, np.nextafter(c, F32(np.inf))]
    dist = [abs(Fraction(float(v)) - want) for v in cands]
    best = min(dist)
    picks = [v for v, d in zip(cands, dist) if d == best]
    return picks[0] if len(picks) == 1 else [v for v in picks if int(v.view(np.uint32)) % 2 == 0][0]


NF4_THRESH = np.array([f32_of_decimal(t) for t in (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011")], dtype=F32)
INT8_SCALE = F32(7.874015718698502e-3)  # int8_vectorwise_dequant's 1/127


def read_st(path):
    return quant_ref.read_st(path)[0]


def to_dtype(x, dt):
    """f32 array x rounded to dt (nearest even), returned as f64 values"""
    x = np.asarray(x, dtype=F32)
    if dt == "F32":
        return x.astype(np.float64)
    if dt == "F16":
        return x.astype(np.float16).astype(np.float64)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(F32).astype(np.float64)


def ulp(x, dt):
    bits = {"F32": 23, "F16": 10, "BF16": 7}[dt]
    e = np.floor(np.log2(np.maximum(np.abs(x), 2.0 ** -14)))
    return 2.0 ** (e - bits)


def adapter(adir):
    scale, mods = lora_factors(adir)
    ABS.update({m: abs(scale) * (np.abs(v["B"]) @ np.abs(v["A"])) for m, v in mods.items()})
    return {m: scale * (v["B"] @ v["A"]) for m, v in mods.items()}


ABS = {}  # module -> |scale| * |B| @ |A|: the size of the low-rank product's terms


def dequant4(base, name):
    """bitsandbytes dequantize_4bit of weight `name` as f32 [out, in]"""
    qs = [k for k in base if k.startswith(name + ".quant_state.bitsandbytes__")]
    st = json.loads(bytes(base[qs[0]][2]).decode())
    table = NF4 if st["quant_type"] == "nf4" else FP4
    if not np.array_equal(base[name + ".quant_map"][2].view(np.uint32), table.view(np.uint32)):
        fail(name + ": quant_map is not bitsandbytes' table")
    shape, bs = st["shape"], st["blocksize"]
    n = shape[0] * shape[1]
    packed = base[name][2].reshape(-1).view(np.uint8)
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2] = packed >> 4  # the first element in the high nibble
    codes[1::2] = packed & 15
    codes = codes[:n]
    if "nested_offset" in st:
        q2 = base[name + ".absmax"][2].reshape(-1)
        a2 = base[name + ".nested_absmax"][2].reshape(-1).astype(F32)
        m2 = base[name + ".nested_quant_map"][2].reshape(-1).astype(F32)
        nbs = st["nested_blocksize"]
        absmax = (m2[q2] * a2[np.arange(q2.size) // nbs]).astype(F32) + F32(st["nested_offset"])
    else:
        absmax = base[name + ".absmax"][2].reshape(-1).astype(F32)
    vals = (table[codes] * absmax[np.arange(n) // bs]).astype(F32)
    return vals.reshape(shape)


def dequant8(base, name):
    mod = name[:-len(".weight")]
    q = base[name][2].astype(F32)
    scb = base[mod + ".SCB"][2].astype(F32).reshape(-1, 1)
    return ((q * scb).astype(F32) * INT8_SCALE).astype(F32)


def is_state(name):
    return (".quant_state." in name or name.endswith((".absmax", ".quant_map", ".nested_absmax",
                                                       ".nested_quant_map", ".SCB", ".weight_format")))


def check_merged(name, w, x, oa, dt):
    """output oa (dtype dt) against the exact f64 merge x = w + delta: within half an ulp of dt
    plus the f32 rounding of the merge (a few f32 ulps of the largest term: the base, the result,
    or the low-rank product's terms, which an f32 sum may cancel)"""
    got = oa.astype(np.float64)
    mod = name[:-len(".weight")]
    big = np.maximum(np.maximum(np.abs(w), np.abs(x)), ABS.get(mod, np.abs(x - w)))
    tol = 0.5 * ulp(x, dt) + 4 * ulp(big, "F32") + 1e-30
    err = np.abs(got - x)
    if (err > tol).any():
        k = np.unravel_index(np.argmax(err - tol), err.shape)
        fail("%s%s: %.9g, want %.9g (tol %.3g)" % (name, k, got[k], x[k], tol[k]))


def check_dequant(bdir, adir, odir, dt):
    base = read_st(bdir + "/model.safetensors")
    out = read_st(odir + "/model.safetensors")
    deltas = adapter(adir)
    ocfg = json.load(open(odir + "/config.json"))
    if "quantization_config" in ocfg:
        fail("quantization_config kept in a dequantized output")
    n4 = n8 = nm = nu = 0
    for name, (bdt, shp, a, raw) in base.items():
        if is_state(name):
            if name in out:
                fail(name + ": quant-state tensor written in a dequantized output")
            continue
        four = any(k.startswith(name + ".quant_state.") for k in base)
        eight = bdt == "I8" and name.endswith(".weight") and name[:-len(".weight")] + ".SCB" in base
        if not four and not eight:  # kept as it is (llm_int8_skip_modules ...), merged when targeted
            mod = name[:-len(".weight")]
            odt = out[name][0]
            if odt not in (bdt, dt):  # kept, or converted by an explicit --dtype
                fail("%s: an unquantized tensor changed dtype (%s -> %s)" % (name, bdt, odt))
            if mod in deltas:
                w = a.astype(np.float64)
                check_merged(name, w, w + deltas[mod], out[name][2], odt)
                nm += 1
            elif odt != bdt:
                if not np.array_equal(out[name][2].astype(np.float64), to_dtype(a.astype(F32), odt)):
                    fail(name + ": an unquantized tensor converted wrongly")
            elif out[name][3] != raw:
                fail(name + ": an unquantized tensor changed")
            nu += 1
            continue
        w = dequant4(base, name) if four else dequant8(base, name)
        n4 += four
        n8 += eight
        odt, oshp, oa, oraw = out[name]
        if odt != dt or list(oshp) != list(w.shape):
            fail("%s is %s %s, not %s %s" % (name, odt, oshp, dt, list(w.shape)))
        mod = name[:-len(".weight")]
        if mod in deltas:
            nm += 1
            check_merged(name, w.astype(np.float64), w.astype(np.float64) + deltas[mod], oa, dt)
        elif not np.array_equal(oa.astype(np.float64), to_dtype(w, dt)):
            fail(name + ": untouched weight is not its dequantized value rounded once to " + dt)
    print("ok %d 4-bit and %d 8-bit weights dequantized (%d merged), %d other tensors identical" % (n4, n8, nm, nu))


def dynamic_map():
    """functional.py create_dynamic_map(signed=True) in f32: torch.linspace(0.1, 1, 2^i + 1) (its
    scalar formula: start + step * j below the half, end - step * (steps - 1 - j) from it), the
    means of neighbours, times 10 ** (i - 6) as f32, with 0 and 1, sorted"""
    data = []
    for i in range(7):
        steps = 2 ** i + 1
        start, end = F32(0.1), F32(1.0)
        step = F32((end - start) / F32(steps - 1))
        b = [F32(start + step * F32(j)) if j < steps // 2 else F32(end - step * F32(steps - 1 - j))
             for j in range(steps)]
        scale = F32(10.0 ** (i - 6))
        for j in range(steps - 1):
            m = F32(F32(b[j] + b[j + 1]) / F32(2.0))
            data += [F32(scale * m), F32(-scale * m)]
    data += [F32(0.0), F32(1.0)]
    data += [F32(0.0)] * (256 - len(data))
    return np.sort(np.array(data, dtype=F32))


def dquantize(code, x):
    """kernels.cu dQuantize<0> as written: binary search, then the f32 midpoint of the neighbours"""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper, val = F32(-1.0), F32(1.0), code[127]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[255]
    if lower_pivot == 0:
        lower = code[0]
    if x > val:
        return upper_pivot if x > F32((upper + val) * F32(0.5)) else pivot
    return lower_pivot if x < F32((lower + val) * F32(0.5)) else pivot


def double_quant_absmax(amax):
    """quantize_4bit(compress_statistics=True) then dequantize_4bit's absmax: offset = the mean
    (exact, rounded once to f32), absmax - offset in blocks of 256 with the dynamic map"""
    code = dynamic_map()
    offset = F32(math.fsum(float(v) for v in amax) / amax.size)
    c = (amax - offset).astype(F32)
    out = np.empty_like(amax)
    for b0 in range(0, c.size, 256):
        blk = c[b0:b0 + 256]
        a2 = np.abs(blk).max().astype(F32)
        inv = F32(F32(1.0) / a2)
        for k, v in enumerate(blk):
            q = dquantize(code, F32(v * inv))
            out[b0 + k] = F32(F32(code[q] * a2) + offset)
    return out


def nf4_roundtrip(x, double=False):
    """kernels.cu kQuantizeBlockwise(NF4) then kDequantizeBlockwise, per block of 64 (f32); double:
    with the absmax double-quantized (bnb_4bit_use_double_quant)"""
    flat = x.reshape(-1).astype(F32)
    out = np.empty_like(flat)
    amax = np.array([np.abs(flat[b0:b0 + 64]).max() for b0 in range(0, flat.size, 64)], dtype=F32)
    used = double_quant_absmax(amax) if double else amax
    for k, b0 in enumerate(range(0, flat.size, 64)):
        blk = flat[b0:b0 + 64]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (blk * (F32(1.0) / amax[k])).astype(F32)
        code = np.searchsorted(NF4_THRESH, s, side="left")  # thresholds below s
        code[np.isnan(s)] = 0  # every comparison false: the tree's lowest code
        out[b0:b0 + 64] = (NF4[code] * used[k]).astype(F32)
    return out.reshape(x.shape)


def check_simulate(bdir, adir, odir, double=False):
    base = read_st(bdir + "/model.safetensors")
    out = read_st(odir + "/model.safetensors")
    deltas = adapter(adir)
    n = 0
    for name, (bdt, shp, a, raw) in base.items():
        mod = name[:-len(".weight")]
        odt, oshp, oa, oraw = out[name]
        if mod not in deltas:
            if oraw != raw:
                fail(name + ": an untouched tensor changed")
            continue
        w = to_dtype(nf4_roundtrip(a.astype(F32), double), bdt)  # what the adapter saw: bnb's output dtype
        check_merged(name, w, w + deltas[mod], oa, odt)
        # and it is not the plain merge
        plain = a.astype(np.float64) + deltas[mod]
        if np.abs(oa.astype(np.float64) - plain).max() < 1e-3 * np.abs(plain).max():
            fail(name + ": output equals the plain merge (NF4 not simulated)")
        n += 1
    print("ok %d weights merged into their NF4 round trip" % n)


if __name__ == "__main__":
    m = sys.argv[1]
    if m == "dequant":
        check_dequant(*sys.argv[2:6])
    elif m == "simulate":
        check_simulate(*sys.argv[2:5])
    elif m == "simulate-double":
        check_simulate(*sys.argv[2:5], double=True)
    elif m == "tables":
        print(" ".join("%08x" % v for v in NF4.view(np.uint32)))
        print(" ".join("%08x" % v for v in FP4.view(np.uint32)))
    else:
        fail("unknown mode " + m)
