#!/usr/bin/env python3
"""The main loop of each kernel in a cuobjdump -sass listing, by instruction class.

Without a GPU, this is how the flash kernels' per-iteration work is compared: the loop with the
most tensor-core instructions (HMMA, or HGMMA for wgmma) is the kernel's main loop, and its static instruction count
by class (tensor core, ldmatrix, floating point, integer, memory, control) says how many issue
slots an iteration spends besides the tile products. Loops nested in it are listed with their
size: they run more than once per iteration, so their instructions count again. These are
static counts (both sides of every branch), not a profile.

    python3 scripts/sass_loops.py listing.sass [kernel ...]
(scripts/gpu_check.sh sass makes the listing from kernels/flash_attention.cu and runs this.)
"""
import collections
import re
import sys

CLASSES = ("mma", "ldsm", "fp", "int", "mem", "ctl")
MEMORY = {"LDS", "STS", "LDG", "STG", "LDGSTS", "REDG", "RED", "ATOMG", "ATOMS", "LDL", "STL"}
CONTROL = {"BRA", "BAR", "BSSY", "BSYNC", "WARPSYNC", "DEPBAR", "LDGDEPBAR", "NOP", "MEMBAR",
           "FENCE", "CCTL", "ERRBAR", "EXIT", "RET", "CALL"}


def klass(op):
    base = op.split(".")[0]
    if base in ("HMMA", "HGMMA"):
        return "mma"
    if base == "LDSM":
        return "ldsm"
    if base in MEMORY:
        return "mem"
    if base in CONTROL:
        return "ctl"
    if base[0] == "F" or base in ("MUFU", "HADD2", "HFMA2", "HMUL2"):
        return "fp"
    return "int"


def functions(text):
    parts = re.split(r"\n\s*Function : (\w+)\n", text)
    for name, body in zip(parts[1::2], parts[2::2]):
        ins = []
        for line in body.splitlines():
            m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)(.*?);", line)
            if m:
                ins.append((int(m.group(1), 16), m.group(3), m.group(4)))
        yield name, ins


def backward_branches(ins):
    """(target index, branch index) of every branch to an earlier instruction."""
    at = {a: i for i, (a, _, _) in enumerate(ins)}
    for i, (a, op, rest) in enumerate(ins):
        t = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if t and int(t.group(1), 16) < a and int(t.group(1), 16) in at:
            yield at[int(t.group(1), 16)], i


def main_loop(ins):
    best = None
    for j, i in backward_branches(ins):
        mma = sum(1 for x in ins[j:i + 1] if x[1].startswith(("HMMA", "HGMMA")))
        if mma and (best is None or mma > best[0]):
            best = (mma, j, i)
    return best


def report(name, ins):
    loop = main_loop(ins)
    if loop is None:
        return None
    _, j, i = loop
    counts = collections.Counter(klass(op) for _, op, _ in ins[j:i + 1])
    inner = [(b - a + 1) for a, b in backward_branches(ins) if j <= a and b < i]
    total = i - j + 1
    cells = " ".join("%5d" % counts[c] for c in CLASSES)
    nested = ", ".join(str(n) for n in inner) or "-"
    return "%-34s %6d %s   %s" % (name, total, cells, nested)


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    wanted = set(sys.argv[2:])
    print("%-34s %6s %s   %s" % ("kernel (main loop, static)", "instrs", " ".join("%5s" % c for c in CLASSES),
                                  "nested loops (instrs)"))
    for name, ins in sorted(functions(open(sys.argv[1]).read())):
        if wanted and name not in wanted:
            continue
        line = report(name, ins)
        if line:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
