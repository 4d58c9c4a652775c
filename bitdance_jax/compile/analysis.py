"""What a compiled TPU program costs per chip: memory, FLOPs, collectives and the roofline time, read from XLA's analyses and the optimized HLO."""
from __future__ import annotations

import re

import jax
import numpy as np

from bitdance_jax.train.metrics import HBM, TPU_CHIPS, hbm, peak_flops

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = (.*?) ([\w-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) .*\{\s*$")
_CALLED = re.compile(r"\b(condition|body|calls|to_apply|branch_computations|called_computations)"
                     r"=(\{[^}]*\}|%[\w.-]+)")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (an HLO result type, maybe a tuple)."""
    return int(sum(_DTYPE_BYTES[d] * int(np.prod([int(x) for x in dims.split(",") if x]))
                   for d, dims in _SHAPE.findall(text)))


def memory(compiled) -> dict:
    """Per-chip bytes of the compiled program (``memory_analysis``); total counts donated
    (aliased) buffers once."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "temps": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] + out["temps"] - out["aliased"]
    return out


def _computations(hlo_text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            name = head.group(1)
            comps[name] = []
            if line.startswith("ENTRY"):
                comps["__entry__"] = comps[name]
        elif name is not None:
            comps[name].append(line)
    return comps


def _trip_count(condition: list[str]) -> int:
    """Iterations of a scan-style ``while``: the bound its condition compares the counter to
    (the largest integer constant there; 1 when none is written)."""
    bounds = [int(v) for line in condition for v in re.findall(r"s32\[\](?:\{[^}]*\})? constant\((\d+)\)", line)]
    return max(bounds, default=1)


def _multipliers(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per call of the entry (loop bodies times their
    trip counts, nested loops multiplied)."""
    mult: dict[str, int] = {}
    stack = [("__entry__", 1)]
    while stack:
        name, m = stack.pop()
        if name not in comps or mult.get(name, 0) >= m:
            continue
        mult[name] = m
        for line in comps[name]:
            called = dict((k, [c.strip().lstrip("%") for c in v.strip("{}").split(",") if c.strip()])
                          for k, v in _CALLED.findall(line))
            trips = _trip_count(comps.get(called["condition"][0], [])) if "condition" in called else 1
            for kind, names in called.items():
                for child in names:
                    stack.append((child, m * (trips if kind == "body" else 1)))
    return mult


def collectives(hlo_text: str) -> dict:
    """{op: {count, bytes}} of the optimized HLO's collectives per step and chip: each op's
    result bytes, ops inside loops counted once per iteration (async start/done pairs once)."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    comps = _computations(hlo_text)
    mult = _multipliers(comps)
    for name, lines in comps.items():
        if name == "__entry__":
            continue
        for line in lines:
            inst = _INSTRUCTION.match(line)
            if inst is None or inst.group(2) not in out:
                continue
            m = mult.get(name, 0)   # 0: a computation no call reaches
            out[inst.group(2)]["count"] += m
            out[inst.group(2)]["bytes"] += m * shape_bytes(inst.group(1))
    return out


def _dims(shape_text: str) -> list[int]:
    found = _SHAPE.search(shape_text)
    return [int(x) for x in found.group(2).split(",") if x] if found else []


def _matmul_flops(line: str, op: str, result: str, shapes: dict[str, str]) -> float:
    """2 x MACs of one ``dot`` or ``convolution`` (operand shapes from ``shapes``)."""
    operands = re.findall(r"%([\w.-]+)", line.split(op + "(", 1)[1].split(")", 1)[0])
    out = float(np.prod(_dims(result)))
    if op == "dot":
        lhs = _dims(shapes.get(operands[0], ""))
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        k = np.prod([lhs[int(i)] for i in contract.group(1).split(",") if i]) if contract else 1
        return 2.0 * out * float(k)
    rhs = _dims(shapes.get(operands[1], ""))
    labels = re.search(r"dim_labels=\w+_(\w+)->", line)
    o = labels.group(1).index("o") if labels and "o" in labels.group(1) else len(rhs) - 1
    # The kernel's input features are already per group: MACs per output = kernel / out features.
    per_out = np.prod(rhs) / max(rhs[o], 1) if rhs else 0
    return 2.0 * out * float(per_out)


def matmul_flops(hlo_text: str) -> float:
    """Dot and convolution FLOPs of one run of the optimized HLO per chip, every loop body
    counted once per iteration (XLA's cost analysis counts it once)."""
    comps = _computations(hlo_text)
    mult = _multipliers(comps)
    total = 0.0
    for name, lines in comps.items():
        if name == "__entry__":
            continue
        shapes = {}
        for line in lines:
            inst = _INSTRUCTION.match(line)
            if inst is None:
                continue
            shapes[line.split("=", 1)[0].strip().removeprefix("ROOT ").lstrip("%")] = inst.group(1)
            if inst.group(2) in ("dot", "convolution"):
                total += mult.get(name, 0) * _matmul_flops(line, inst.group(2), inst.group(1), shapes)
    return total


def cost(compiled) -> dict:
    """XLA's per-chip cost analysis of the compiled program ({flops, bytes accessed})."""
    c = compiled.cost_analysis()
    c = (c[0] if c else {}) if isinstance(c, (list, tuple)) else (c or {})
    return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}


def roofline_s(flops: float, bytes_accessed: float, device_kind: str, dtype: str) -> float | None:
    """The larger of compute time at the chip's peak and HBM time at its bandwidth."""
    peak, mem = peak_flops(device_kind, dtype), hbm(device_kind)
    if not peak or mem is None:
        return None
    return max(flops / peak, bytes_accessed / mem[1])


def per_chip_bytes(tree) -> dict:
    """{path: bytes one chip holds} of a tree of ShapeDtypeStructs with shardings."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shard = leaf.sharding.shard_shape(leaf.shape)
        out[jax.tree_util.keystr(path)] = int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
    return out


def hbm_table() -> dict:
    return {chip: HBM[kind][0] for chip, kind in TPU_CHIPS.items()}


def biggest_buffers(hlo_text: str, arguments: dict[str, int], n: int = 5) -> list[str]:
    """The largest per-chip arguments (by name) and HLO results (by instruction), for the
    message of a program that does not fit."""
    args = sorted(arguments.items(), key=lambda kv: -kv[1])[:n]
    results = []
    for line in hlo_text.splitlines():
        inst = _INSTRUCTION.match(line)
        if inst is not None:
            results.append((shape_bytes(inst.group(1)), line.split("=", 1)[0].strip(),
                            inst.group(2)))
    results.sort(reverse=True)
    return ([f"argument {k}: {v / 1e9:.2f} GB" for k, v in args]
            + [f"{op} {name}: {b / 1e9:.2f} GB" for b, name, op in results[:n]])
