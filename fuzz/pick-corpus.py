#!/usr/bin/env python3
# Usage: pick-corpus.py CONTROL_FILE SEEDS CAP, from fuzz/, after
#   target/x86_64-unknown-linux-gnu/release/TARGET -merge=1 -use_counters=0 \
#       -merge_control_file=CONTROL_FILE OUT corpus/TARGET target/work-corpus/TARGET
# with SEEDS the number of files in corpus/TARGET; then copy the printed files into corpus/TARGET.
# Greedy set cover over the edges libFuzzer's merge control file records per input: the
# hand-written seeds first, then the input adding the most uncovered edges, until none adds
# any or CAP inputs are picked. Prints the picked files.
import sys
control, nseeds, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = open(control).read().split("\n")
n = int(lines[0]); files = lines[2:2 + n]
cov = {}
for line in lines[2 + n:]:
    parts = line.split()
    if parts and parts[0] == "COV":
        cov[int(parts[1])] = set(parts[2:])
seeds = {i for i, f in enumerate(files) if f.startswith("corpus/")}
assert len(seeds) == nseeds, (len(seeds), nseeds)
covered = set()
for i in seeds:
    covered |= cov.get(i, set())
picked = []
while len(picked) < cap:
    best = max((i for i in cov if i not in seeds and i not in picked), key=lambda i: (len(cov[i] - covered), -len(open(files[i], "rb").read())), default=None)
    if best is None or not cov[best] - covered:
        break
    picked.append(best); covered |= cov[best]
total = set().union(*cov.values())
print(f"# seeds {nseeds}, picked {len(picked)}, edges {len(covered)} of {len(total)}", file=sys.stderr)
for i in picked:
    print(files[i])
