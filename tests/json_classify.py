#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""json_classify.py : how Python's json (PEFT reads adapter_config.json with json.load on a file
opened as UTF-8 text) sees each file named on the command line; one line per file:
    refuse   Python raises (bad UTF-8, BOM, syntax, trailing data)
    dup      Python accepts, taking the last of two equal keys in one object
    ext      Python accepts only through its extensions (NaN/Infinity, lone surrogate escapes)
             or nesting deeper than 64
    ok       plain JSON that Python accepts
Used by test_adapter_config's differential test."""
import json
import sys


class Dup(Exception):
    pass


class Ext(Exception):
    pass


def pairs(items):
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise Dup()
    return dict(items)


def const(_name):
    raise Ext()


def walk(v, depth):
    if depth > 64:
        raise Ext()
    if isinstance(v, str):
        if any(0xD800 <= ord(c) <= 0xDFFF for c in v):
            raise Ext()
    elif isinstance(v, list):
        for x in v:
            walk(x, depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            walk(k, depth + 1)
            walk(x, depth + 1)


def classify(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
        json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "refuse"
    try:
        walk(json.loads(text, object_pairs_hook=pairs, parse_constant=const), 1)
    except Dup:
        return "dup"
    except Ext:
        return "ext"
    return "ok"


for p in sys.argv[1:]:
    print(classify(p), p)
