#!/usr/bin/env bash
# Mutation testing with cosmic-ray (a dev dependency; not part of CI's default run).
# cosmic-ray mutates the file in place, runs the test command, and restores it, so the
# editable install and the package-dir layout (mmloom.train -> train/) need nothing special.
#
#   bench/mutation.sh MODULE [FUNCTION...] -- TEST COMMAND...
#
# MODULE: a file, e.g. filters/captions.py; FUNCTION: a name or Class.method whose lines
# alone are mutated (default: the whole module); after `--`, the test command (fast and
# targeted; exit 0 = the mutant survived). Prints cosmic-ray's report and a count line;
# the session (mutation/NAME.sqlite) keeps every mutant's diff: `cr-report --show-diff`.
#   bench/mutation.sh filters/captions.py -- python -m pytest -x -q -p no:cacheprovider tests/test_captions.py
#   bench/mutation.sh train/families/mtdiffusion.py ForwardAggregation -- python -m pytest -x -q tests/test_mechanisms.py -k aggregation
# Never run two sessions on one module at once (both edit the file); if interrupted, `git checkout MODULE`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/cosmic-ray ] || ./dev python -c pass
# shellcheck disable=SC1091
source .venv/bin/activate
module=$1; shift
funcs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do funcs+=("$1"); shift; done
[ "${1:-}" = "--" ] || { echo "usage: bench/mutation.sh MODULE [FUNCTION...] -- TEST COMMAND..." >&2; exit 2; }
shift
[ $# -gt 0 ] || { echo "bench/mutation.sh: no test command after --" >&2; exit 2; }
git diff --quiet -- "$module" || { echo "bench/mutation.sh: $module has uncommitted changes; commit them first" >&2; exit 2; }
mkdir -p mutation
name=$(echo "$module ${funcs[*]:-}" | tr -c 'A-Za-z0-9\n' '_' | sed 's/_*$//')
cfg=mutation/$name.toml session=mutation/$name.sqlite
python - "$module" "$cfg" "$*" "${funcs[@]}" <<'PY'
import ast, json, sys
module, cfg, command, *funcs = sys.argv[1:]
lines = []
if funcs:
    tree = ast.parse(open(module).read())
    found = {}
    def walk(node, prefix=""):
        for n in ast.iter_child_nodes(node):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found[prefix + n.name] = (n.lineno, n.end_lineno)
                walk(n, prefix + n.name + ".")
    walk(tree)
    for f in funcs:
        if f not in found:
            sys.exit(f"bench/mutation.sh: no function or class {f} in {module}")
        lines.append("%d-%d" % found[f])
with open(cfg, "w") as fh:
    fh.write("[cosmic-ray]\n")
    fh.write(f"module-path = {json.dumps(module)}\ntimeout = 300.0\nexcluded-modules = []\n")
    fh.write(f"test-command = {json.dumps(command)}\n\n[cosmic-ray.distributor]\nname = \"local\"\n")
    if lines:
        fh.write(f"\n[cosmic-ray.filters.line-filter.lines]\n{json.dumps(module)} = {json.dumps(lines)}\n")
PY
rm -f "$session"
cosmic-ray init "$cfg" "$session"
[ ${#funcs[@]} -eq 0 ] || cr-filter-lines --config "$cfg" "$session"
cr-filter-pragma "$session"  # lines marked `# pragma: no mutate`
trap 'git checkout -- "$module"' EXIT
cosmic-ray exec "$cfg" "$session"
cr-report "$session" --show-pending | tail -n 8
python - "$session" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute("select test_outcome, worker_outcome, count(*) from work_results group by 1, 2").fetchall()
count = {f"{t or w}".lower(): n for t, w, n in rows}
print("mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(count.items())))
PY
