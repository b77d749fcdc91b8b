#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""deq_ref.py : an independent dequantization of a whole quantized checkpoint (test_quant_ct.c's
every-adapter-type test).  numpy only, no code from src/: the formats' definitions are the other
references' (quant_ref.py block FP8, ct_ref.py compressed-tensors FP8 and NVFP4, bnb_ref.py
bitsandbytes 4-bit and 8-bit).

  deq_ref.py dequant BASE_DIR OUT_DIR
        writes OUT_DIR/model.safetensors: every quantized weight as its F32 values under the
        weight's name ("<m>.weight" [out, in]), its scale and quant-state tensors left out, every
        other tensor as it is; OUT_DIR/config.json without quantization_config
  deq_ref.py same OUT_A OUT_B [REL]
        the two outputs hold the same tensors with the same dtypes, shapes and bytes (REL: values
        within REL times the tensor's amax instead of the same bytes)
Prints one line; exit 1 on the first failure."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bnb_ref import dequant4, dequant8, is_state  # noqa: E402
from ct_ref import E4M3, ct_args, fp8_blocks, nv_dequant, unpack  # noqa: E402
from quant_ref import fail, fp8_dequant, read_st, write_st  # noqa: E402


def dequant(bdir, odir):
    base, _ = read_st(bdir + "/model.safetensors")
    cfg = json.load(open(bdir + "/config.json"))
    qc = cfg.pop("quantization_config", {})
    br, bc = qc.get("weight_block_size", [128, 128])
    out, drop, n_q = {}, set(), 0
    for name, (dt, shp, a, raw) in base.items():
        if dt == "F8_E4M3" and name + "_scale_inv" in base:  # block FP8
            out[name] = ("F32", fp8_dequant(a, base[name + "_scale_inv"][2], br, bc).astype(np.float32))
            drop.add(name + "_scale_inv")
        elif dt == "F8_E4M3" and name + "_scale" in base:  # compressed-tensors FP8: x_q * scale
            s = base[name + "_scale"][2]
            br_, bc_ = fp8_blocks(shp, s.shape, ct_args(bdir)[1])
            s2 = s.reshape(-1, s.shape[-1]) if s.ndim >= 2 else s.reshape(1, 1)
            out[name] = ("F32", fp8_dequant(a, s2, br_, bc_).astype(np.float32))
            drop.update([name + "_scale", name[:-len(".weight")] + ".input_scale"])
        elif dt == "U8" and (name.endswith(".weight_packed") or name + "_scale_2" in base):  # NVFP4
            stem = name[:-len("_packed")] if name.endswith("_packed") else name
            mo = not name.endswith("_packed")
            g2 = stem + ("_scale_2" if mo else "_global_scale")
            s8 = E4M3[base[stem + "_scale"][2]]
            codes = unpack(a)
            w = nv_dequant(codes, s8, float(base[g2][2].reshape(-1)[0]), codes.shape[1] // s8.shape[1], mo)
            out[stem] = ("F32", w.astype(np.float32))
            drop.update([name, stem + "_scale", g2, stem[:-len(".weight")] + ".input_scale"])
        elif any(k.startswith(name + ".quant_state.bitsandbytes__") for k in base):  # bnb 4-bit
            out[name] = ("F32", dequant4(base, name))
        elif dt == "I8" and name.endswith(".weight") and name[:-len(".weight")] + ".SCB" in base:  # bnb 8-bit
            out[name] = ("F32", dequant8(base, name))
            drop.update([name[:-len(".weight")] + ".SCB", name[:-len(".weight")] + ".weight_format"])
        else:
            continue
        n_q += 1
    for name, (dt, shp, a, raw) in base.items():
        if name in out or name in drop or is_state(name):
            continue
        out[name] = (dt, np.frombuffer(raw, np.uint16).reshape(shp) if dt == "BF16" else a)
    if n_q == 0:
        fail("no quantized weights in " + bdir)
    os.makedirs(odir, exist_ok=True)
    write_st(odir + "/model.safetensors", {k: out[k] for k in sorted(out)})
    with open(odir + "/config.json", "w") as f:
        json.dump(cfg, f)
    print("ok %d quantized weights dequantized, %d tensors" % (n_q, len(out)))


def same(a_dir, b_dir, rel=None):
    a, _ = read_st(a_dir + "/model.safetensors")
    b, _ = read_st(b_dir + "/model.safetensors")
    if sorted(a) != sorted(b):
        fail("different tensors: %s" % sorted(set(a) ^ set(b)))
    worst = 0.0
    for name in a:
        if a[name][:2] != b[name][:2]:
            fail("%s: %s %s vs %s %s" % (name, a[name][0], a[name][1], b[name][0], b[name][1]))
        if rel is None:
            if a[name][3] != b[name][3]:
                fail(name + ": different bytes")
            continue
        x, y = a[name][2].astype(np.float64), b[name][2].astype(np.float64)
        d = np.abs(x - y).max() / max(np.abs(y).max(), 1e-300)
        if not d <= rel:
            fail("%s: differs by %.3g of its amax (at most %.3g)" % (name, d, rel))
        worst = max(worst, d)
    print("ok %d tensors %s" % (len(a), "identical" if rel is None else "within %.3g of their amax" % worst))


if __name__ == "__main__":
    if sys.argv[1] == "dequant":
        dequant(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "same":
        same(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else None)
    else:
        fail("unknown mode " + sys.argv[1])
