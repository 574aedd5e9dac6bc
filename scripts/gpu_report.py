#!/usr/bin/env python3
"""The tables of `gpu_check.sh all` (and its CPU dry run): parsing, comparing, the results file.

    gpu_report.py tests-table LOG MD              the GPU test binaries' output -> a markdown table
    gpu_report.py demo-compare CPU_CSV RUN_CSV MD  the demo's per-step losses on two backends
    gpu_report.py results WORK OUT_MD             every part's table and status -> results.md;
                                                  prints the summary table
    gpu_report.py check-results MD                exits 1 unless every section is in the file
    gpu_report.py self-test                       all of the above on made-up inputs (CI)

Standard library only: it runs on the GPU box and in CI.
"""

import csv
import json
import os
import re
import shutil
import sys

# The parts of `gpu_check.sh all`, in order: (name, section title). The results file has one
# section per part, whatever happened to it, so check-results can insist on all of them.
PARTS = [
    ("tests", "1. GPU tests: every kernel and a whole training step against the CPU"),
    ("demo", "1b. Demo training on the GPU against the CPU run"),
    ("bench", "2. The 1.3B training step: sft bench next to PyTorch + transformers"),
    ("attention", "3. Attention next to PyTorch flash SDPA"),
    ("kernels", "4. Cross-entropy and AdamW next to PyTorch, copy bandwidth"),
]
HEAD_SECTIONS = ["## Machine and build", "## Summary"]

# The demo comparison (see demo_compare): window of steps averaged, allowed gap of the
# window means, allowed gap of the first step's loss.
DEMO_WINDOW = 10
DEMO_WINDOW_REL, DEMO_WINDOW_ABS = 0.10, 0.02
DEMO_FIRST_REL = 0.01


def md_table(header, rows, align=None):
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_tests(path):
    """Rows of (binary, test, result, max relative error) from libtest's --nocapture output."""
    rows, cur, binary = [], None, "?"
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        m = re.match(r"^== (\S+)", line)  # gpu_check.sh writes "== <binary>" before each binary
        if m:
            binary, cur = m.group(1), None
            continue
        m = re.match(r"^test (\S+) \.\.\. ?(.*)$", line)
        if m:
            cur = {"binary": binary, "name": m.group(1), "result": None, "err": 0.0, "skip": None}
            rows.append(cur)
            line = m.group(2)
        if cur is None:
            continue
        m = re.search(r"skipped: (.*)", line)
        if m:
            cur["skip"] = m.group(1).strip()
        for e in re.findall(r"relative error ([0-9.eE+-]+)", line):
            try:
                cur["err"] = max(cur["err"], float(e))
            except ValueError:
                pass
        tail = line.strip()
        for word in ("ok", "FAILED", "ignored"):
            if tail == word or tail.endswith(" " + word):
                cur["result"] = word
    return rows


def tests_table(log, md):
    rows = parse_tests(log)
    out, counts, reasons = [], {}, set()
    for r in rows:
        res = "skipped" if r["skip"] else (r["result"] or "no result (crashed or timed out)")
        counts[res] = counts.get(res, 0) + 1
        if r["skip"]:
            reasons.add(r["skip"])
        out.append([r["binary"], "`%s`" % r["name"], res, "%.2e" % r["err"] if r["err"] else "-"])
    text = md_table(["binary", "test", "result", "max rel err"], out)
    summary = ", ".join("%d %s" % (n, k) for k, n in sorted(counts.items())) or "no tests found"
    text += "\n%s.\n" % summary
    for reason in sorted(reasons):
        text += "\nSkipped because: %s\n" % reason
    open(md, "w").write(text)
    print(text)
    ok = bool(rows) and all(r["result"] == "ok" and not r["skip"] for r in rows)
    skipped_only = bool(rows) and all(r["skip"] for r in rows)
    write_headline(md, summary)
    # 0: every test passed; 3: every test skipped (no GPU: the dry run); 1: anything else.
    return 0 if ok else 3 if skipped_only else 1


def read_losses(path):
    """(step, train_loss) pairs of a training log.csv (sft's header; steps without a loss dropped)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "train_loss" not in reader.fieldnames or "step" not in reader.fieldnames:
            raise SystemExit("%s: not a training log (no step/train_loss columns)" % path)
        out = []
        for i, row in enumerate(reader, start=2):
            if row["train_loss"].strip():
                try:
                    out.append((int(row["step"]), float(row["train_loss"])))
                except ValueError:
                    raise SystemExit("%s line %d: step %r / train_loss %r are not numbers"
                                     % (path, i, row["step"], row["train_loss"]))
    return out


def demo_compare(cpu_csv, run_csv, md, label="gpu"):
    """Compares a run's per-step losses with the CPU reference.

    Tolerances, and why: the GPU computes in bf16 (weights, activations) where the CPU computes
    in f32, so the two runs drift apart step by step and single steps (each a different batch)
    cannot be compared tightly. The first step can: same weights, same batch, only rounding, as
    tests/gpu_train.rs asserts for one step (loss within 1% relative). After that, the mean loss
    over windows of 10 steps must stay within 10% (+0.02 absolute, for the small losses late in
    the run) of the CPU's — the rule tests/gpu_train.rs applies to the 200-step run. A bug that
    breaks training (a wrong gradient, a stale buffer) moves a window mean by far more: the loss
    falls from about 5.8 to about 1.2 in these 100 steps.
    """
    cpu, run = read_losses(cpu_csv), read_losses(run_csv)
    fails = []
    if not cpu or not run:
        fails.append("empty log (%d cpu steps, %d %s steps)" % (len(cpu), len(run), label))
    if [s for s, _ in cpu] != [s for s, _ in run]:
        fails.append("the steps differ: cpu %d steps, %s %d steps" % (len(cpu), label, len(run)))
    n = min(len(cpu), len(run))
    rows = []
    if n:
        c1, r1 = cpu[0][1], run[0][1]
        ok = abs(r1 - c1) <= DEMO_FIRST_REL * c1
        rows.append(["step 1", "%.4f" % c1, "%.4f" % r1, "%+.2f%%" % (100 * (r1 - c1) / c1),
                     "<= %.0f%%" % (100 * DEMO_FIRST_REL), "ok" if ok else "FAIL"])
        if not ok:
            fails.append("step 1: %s %.4f vs cpu %.4f" % (label, r1, c1))
    for w in range(0, n, DEMO_WINDOW):
        c = [x for _, x in cpu[w:w + DEMO_WINDOW]]
        r = [x for _, x in run[w:w + DEMO_WINDOW]]
        mc, mr = sum(c) / len(c), sum(r) / len(r)
        allowed = DEMO_WINDOW_REL * mc + DEMO_WINDOW_ABS
        ok = abs(mr - mc) <= allowed
        rows.append(["steps %d-%d" % (cpu[w][0], cpu[w + len(c) - 1][0]), "%.4f" % mc, "%.4f" % mr,
                     "%+.2f%%" % (100 * (mr - mc) / mc), "<= %.4f" % allowed, "ok" if ok else "FAIL"])
        if not ok:
            fails.append("steps %d-%d: %s mean %.4f vs cpu %.4f" % (cpu[w][0], cpu[w + len(c) - 1][0], label, mr, mc))
    if n >= DEMO_WINDOW and run[n - 1][1] >= 0.5 * run[0][1]:
        fails.append("the %s run did not learn: %.4f -> %.4f" % (label, run[0][1], run[n - 1][1]))
    max_gap = max((abs(a[1] - b[1]) for a, b in zip(cpu, run)), default=float("nan"))
    text = md_table(["steps", "cpu loss (mean)", "%s loss (mean)" % label, "difference", "allowed", "result"],
                    rows, ["---", "---:", "---:", "---:", "---:", "---"])
    text += ("\n%d steps; largest single-step gap %.4f; final loss cpu %.4f, %s %.4f. "
             "Rule: step 1 within %.0f%%; means over %d steps within %.0f%% + %.2f of the CPU's.\n"
             % (n, max_gap, cpu[n - 1][1] if n else float("nan"), label, run[n - 1][1] if n else float("nan"),
                100 * DEMO_FIRST_REL, DEMO_WINDOW, 100 * DEMO_WINDOW_REL, DEMO_WINDOW_ABS))
    if fails:
        text += "\n**Not following the CPU run:** " + "; ".join(fails) + "\n"
    open(md, "w").write(text)
    print(text)
    write_headline(md, ("%s follows cpu over %d steps (final %.3f vs %.3f)" % (label, n, run[n - 1][1], cpu[n - 1][1]))
                   if not fails else "%d check(s) failed" % len(fails))
    return 1 if fails else 0


def write_headline(md, text):
    with open(md + ".headline", "w") as f:
        f.write(text.strip() + "\n")


def read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def results(work, out_md):
    """results.md from WORK: info.json, and per part <part>.status (JSON), <part>.md, <part>.log."""
    info = json.loads(read(os.path.join(work, "info.json"), "{}") or "{}")
    lines = ["# sft GPU check%s" % (" (dry run on the CPU)" if info.get("dry") else ""), ""]
    lines.append(HEAD_SECTIONS[0])
    lines.append("")
    lines.append(md_table(["", ""], [[k, info[k]] for k in info if k != "dry"]))
    statuses = []
    for name, title in PARTS:
        st = json.loads(read(os.path.join(work, name + ".status"), "{}") or "{}")
        st.setdefault("status", "not run")
        st["headline"] = read(os.path.join(work, name + ".md.headline")).strip()
        statuses.append((name, title, st))
    lines.append(HEAD_SECTIONS[1])
    lines.append("")
    summary_rows = [[name, st["status"], "%.0f" % st["seconds"] if "seconds" in st else "-",
                     st.get("budget", "-"), (st.get("note") or st["headline"] or "").replace("|", "/")]
                    for name, _, st in statuses]
    lines.append(md_table(["part", "status", "seconds", "budget s", "note"], summary_rows,
                          ["---", "---", "---:", "---:", "---"]))
    for name, title, st in statuses:
        lines.append("## " + title)
        lines.append("")
        lines.append("Status: **%s**%s%s." % (
            st["status"], " in %.0f s of a %s s budget" % (st["seconds"], st.get("budget", "?")) if "seconds" in st else "",
            " — " + st["note"] if st.get("note") else ""))
        if st.get("command"):
            lines.append("")
            lines.append("Command: `%s`" % st["command"])
        lines.append("")
        table = read(os.path.join(work, name + ".md")).strip()
        if table:
            lines.append(table)
            lines.append("")
        log = read(os.path.join(work, name + ".log"))
        if st["status"] not in ("ok", "skipped", "not run") and log:
            tail = "\n".join(log.rstrip().splitlines()[-40:])
            lines.append("The log's last lines:")
            lines.append("")
            lines.append("```")
            lines.append(tail)
            lines.append("```")
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n"
    with open(out_md, "w") as f:
        f.write(text)
    # The summary, printed last on the terminal.
    print("%-10s %-9s %8s %8s  %s" % ("part", "status", "seconds", "budget", "note"))
    for row in summary_rows:
        print("%-10s %-9s %8s %8s  %s" % tuple(row))
    print("results: %s" % out_md)
    return 0


def check_results(md):
    text = read(md)
    if not text:
        print("check-results: %s is missing or empty" % md)
        return 1
    missing = [h for h in HEAD_SECTIONS if h not in text.splitlines()]
    missing += ["## " + title for _, title in PARTS if "## " + title not in text.splitlines()]
    for key in ("device", "driver", "date", "commit"):
        if not re.search(r"^\| %s \|" % key, text, re.M):
            missing.append("the %s row" % key)
    for name, _ in PARTS:
        if not re.search(r"^\| %s \| \S" % name, text, re.M):
            missing.append("the summary row of %s" % name)
    if missing:
        print("check-results: %s lacks %s" % (md, "; ".join(missing)))
        return 1
    print("check-results: %s has every section" % md)
    return 0


def self_test():
    """Every path above on made-up inputs, for CI (no GPU): the parsers, the demo rule (a run
    that follows passes, one that drifts fails), results.md and its check (a file missing a
    section fails)."""
    import tempfile
    import contextlib
    import io

    d = tempfile.mkdtemp(prefix="gpu_report_test.")
    path = lambda name: os.path.join(d, name)
    quiet = contextlib.redirect_stdout(io.StringIO())
    failures = []

    def expect(what, got, want):
        if got != want:
            failures.append("%s: got %r, expected %r" % (what, got, want))

    log = ("== gpu_ops\nrunning 3 tests\ntest a_matches_cpu ... relative error 3.1e-3\nok\n"
           "test b_matches_cpu ... FAILED\ntest c ... skipped: no GPU\nok\n== gpu_train\n"
           "test d ... relative error 1e-2 relative error 2e-2\n")
    open(path("t.log"), "w").write(log)
    rows = parse_tests(path("t.log"))
    expect("test rows", [(r["binary"], r["name"], r["result"], r["skip"]) for r in rows],
           [("gpu_ops", "a_matches_cpu", "ok", None), ("gpu_ops", "b_matches_cpu", "FAILED", None),
            ("gpu_ops", "c", "ok", "no GPU"), ("gpu_train", "d", None, None)])
    expect("largest error", rows[3]["err"], 2e-2)
    with quiet:
        expect("tests-table status", tests_table(path("t.log"), path("tests.md")), 1)
    open(path("s.log"), "w").write("== gpu_ops\ntest c ... skipped: no GPU\nok\n")
    with contextlib.redirect_stdout(io.StringIO()):
        expect("all skipped", tests_table(path("s.log"), path("s.md")), 3)

    header = "step,progress_pct,train_loss,train_perplexity,val_loss,val_perplexity,lr,grad_norm,time_s,tokens_per_s\n"
    curve = [5.8 * 0.97 ** i + 0.5 for i in range(30)]

    def write_log(name, losses):
        with open(path(name), "w") as f:
            f.write(header + "".join("%d,0,%r,0,,,1e-3,1,0,0\n" % (i + 1, x) for i, x in enumerate(losses)))

    write_log("cpu.csv", curve)
    write_log("near.csv", [x * (1.003 if i % 2 else 0.997) for i, x in enumerate(curve)])
    write_log("drift.csv", [x * (1 + 0.01 * i) for i, x in enumerate(curve)])
    write_log("short.csv", curve[:20])
    with contextlib.redirect_stdout(io.StringIO()):
        expect("following run", demo_compare(path("cpu.csv"), path("near.csv"), path("d1.md")), 0)
        expect("drifting run", demo_compare(path("cpu.csv"), path("drift.csv"), path("d2.md")), 1)
        expect("shorter run", demo_compare(path("cpu.csv"), path("short.csv"), path("d3.md")), 1)
    expect("drift table", "FAIL" in read(path("d2.md")), True)

    work = path("work")
    os.mkdir(work)
    json.dump({"device": "X", "driver": "1", "date": "today", "commit": "abc"}, open(os.path.join(work, "info.json"), "w"))
    for name, _ in PARTS[:3]:
        json.dump({"status": "ok", "seconds": 1.0, "budget": "9"}, open(os.path.join(work, name + ".status"), "w"))
        open(os.path.join(work, name + ".md"), "w").write("| a |\n|---|\n| %s |\n" % name)
    json.dump({"status": "TIMEOUT", "seconds": 9.0, "budget": "9"}, open(os.path.join(work, "attention.status"), "w"))
    open(os.path.join(work, "attention.log"), "w").write("last words\n")
    with contextlib.redirect_stdout(io.StringIO()):
        results(work, path("results.md"))
        expect("complete results", check_results(path("results.md")), 0)
    text = read(path("results.md"))
    expect("not-run part listed", "| kernels | not run |" in text, True)
    expect("timed-out part's log", "last words" in text, True)
    broken = text.replace("## " + PARTS[2][1], "## something else")
    open(path("broken.md"), "w").write(broken)
    with contextlib.redirect_stdout(io.StringIO()):
        expect("a missing section", check_results(path("broken.md")), 1)
    if failures:
        print("gpu_report.py self-test failed (files in %s):\n  %s" % (d, "\n  ".join(failures)))
        return 1
    shutil.rmtree(d)
    print("gpu_report.py self-test: ok")
    return 0


def main(argv):
    cmds = {
        "tests-table": (tests_table, 2),
        "demo-compare": (demo_compare, 3),
        "results": (results, 2),
        "check-results": (check_results, 1),
        "self-test": (self_test, 0),
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    fn, nargs = cmds[argv[1]]
    args = argv[2:]
    if len(args) < nargs:
        print(__doc__, file=sys.stderr)
        return 2
    return fn(*args)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
