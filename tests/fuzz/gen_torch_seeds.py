#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""gen_torch_seeds.py : writes real torch.save() outputs into the .bin fuzz corpora (issue 15).

Run once with a python3 that has torch (the committed files were made with Debian bookworm's
python3-torch 1.13.1, extracted privately: PYTHONPATH/LD_LIBRARY_PATH into the unpacked .debs):
    python3 tests/fuzz/gen_torch_seeds.py tests/fuzz/corpus
Every checkpoint is written to fuzz_torch_zip/torch_<name>.bin and its data.pkl (zip layout) to
fuzz_pickle/torch_<name>.pkl.  Values are small integers or exact binary fractions so that tests
can state them; test_torch_bin.c checks the tied/views/offset/legacy/zip64 files value by value.
"""
import io
import os
import sys
import zipfile

import torch


def ar(n, dtype=torch.float32, scale=0.5):
    return (torch.arange(n, dtype=torch.float64) * scale - 1.0).to(dtype)


def cases():
    w = ar(12).reshape(3, 4)
    yield "tied", {"embed.weight": w, "lm_head.weight": w, "row1": w[1]}, True
    base = ar(24).reshape(4, 6)
    yield "views", {"t": base.t(), "col": base[:, 2], "every2": base[1, ::2], "block": base[1:3, 2:5],
                    "scalar": base[3, 5], "full": base}, True
    big = ar(16)
    yield "offsets", {"tail": big[10:], "mid": big[3:7].view(2, 2), "empty": big[5:5]}, True
    yield "dtypes", {"f16": ar(5, torch.float16), "bf16": ar(5, torch.bfloat16), "f64": ar(3, torch.float64),
                     "i64": torch.tensor([1, -2, 3 << 40], dtype=torch.int64),
                     "i32": torch.tensor([7, -8], dtype=torch.int32), "u8": torch.tensor([0, 255], dtype=torch.uint8),
                     "b": torch.tensor([True, False, True])}, True
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    lin.weight.data = ar(6).reshape(2, 3)
    lin.bias.data = ar(2, scale=0.25)
    yield "module_state_dict", lin.state_dict(), True  # OrderedDict with _metadata (BUILD)
    yield "legacy", {"a": w, "a_tied": w, "view": w[:, 1], "i": torch.tensor([5, 6], dtype=torch.int64)}, False
    yield "empty_dict", {}, True


def zip64_repack(raw):
    """The same archive rewritten by Python's zipfile with zip64 records forced on every entry
    (torch only writes zip64 past 4 GiB, which a seed cannot be)."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    limits = zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT
    # zero limits: zip64 extra fields in the central directory too, and the zip64 end records
    zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT = 0, 0
    try:
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
                with dst.open(zi, "w", force_zip64=True) as f:
                    f.write(src.read(info.filename))
    finally:
        zipfile.ZIP64_LIMIT, zipfile.ZIP_FILECOUNT_LIMIT = limits
    assert b"PK\x06\x06" in out.getvalue() and b"PK\x06\x07" in out.getvalue()
    return out.getvalue()


def main():
    root = sys.argv[1]
    zdir = os.path.join(root, "fuzz_torch_zip")
    pdir = os.path.join(root, "fuzz_pickle")
    for name, obj, new_zip in cases():
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=new_zip)
        raw = buf.getvalue()
        # round trip through torch itself: what we commit is what torch loads
        back = torch.load(io.BytesIO(raw), weights_only=True)
        assert list(back) == list(obj), name
        for k in obj:
            assert torch.equal(back[k], obj[k]), (name, k)
        with open(os.path.join(zdir, "torch_%s.bin" % name), "wb") as f:
            f.write(raw)
        if new_zip:
            z = zipfile.ZipFile(io.BytesIO(raw))
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
            with open(os.path.join(pdir, "torch_%s.pkl" % name), "wb") as f:
                f.write(z.read(pkl))
            if name == "tied":
                z64 = zip64_repack(raw)
                back = torch.load(io.BytesIO(z64), weights_only=True)
                assert all(torch.equal(back[k], obj[k]) for k in obj)
                with open(os.path.join(zdir, "torch_tied_zip64.bin"), "wb") as f:
                    f.write(z64)
    # a list of tensors and a lone tensor (read by lm_torch_obj_load: cloneofsimo .pt files)
    w = ar(12).reshape(3, 4)
    for name, obj in (("list", [w, w[0], ar(3)]), ("tensor", ar(4))):
        buf = io.BytesIO()
        torch.save(obj, buf)
        with open(os.path.join(zdir, "torch_%s.bin" % name), "wb") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    main()
