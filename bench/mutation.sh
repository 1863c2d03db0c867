#!/usr/bin/env bash
# Mutation testing with cosmic-ray (a dev dependency; not part of CI's default run).
# cosmic-ray mutates the file in place, runs the test command, and restores it, so the
# editable install and the package-dir layout (mmloom.train -> train/) need nothing special.
#
#   bench/mutation.sh MODULE [FUNCTION...] -- TEST COMMAND...
#
# MODULE: a file, e.g. filters/captions.py; FUNCTION: a name or Class.method whose lines
# alone are mutated, or a line range FIRST-LAST (default: the whole module); after `--`,
# the test command (fast and targeted; exit 0 = the mutant survived). MUTATION_COUNT=1
# only counts the mutants (no test runs), to size a session first. MUTATION_FORK=1, for a
# command `python -m pytest ARGS`: each mutant's run forks from a server that has imported
# torch & co. once (bench/forkserver.py), about 10x faster on a loaded machine.
# MUTATION_EXCLUDE: cosmic-ray operator regexes to leave out, comma-separated (e.g. the
# bitwise replacements of float arithmetic, which raise TypeError wherever the line runs).
# Mutants inside function signatures' postponed annotations are skipped (never evaluated;
# bench/mutation_skip_annotations.py); MUTATION_KEEP_ANNOTATIONS=1 keeps them.
# The test command runs once on the unmutated code first and must pass (a command that
# fails anyway, e.g. a mis-quoted -k, would count every mutant as killed). Prints cosmic-ray's report and a count line;
# the session (mutation/NAME.sqlite) keeps every mutant's diff: `cr-report --show-diff`.
#   bench/mutation.sh filters/captions.py -- python -m pytest -x -q -p no:cacheprovider tests/test_captions.py
#   bench/mutation.sh train/families/mtdiffusion.py ForwardAggregation -- python -m pytest -x -q tests/test_mechanisms.py -k aggregation
# MUTATION_RESUME=1 continues an interrupted session (mutation/NAME.sqlite) where it stopped,
# if the module is unchanged since it began (a whole module is hours on 2 cores).
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
# a scope of many functions would exceed the file system's 255-byte names (mutation/NAME.baseline.log):
# keep a readable prefix and make it unique with a hash of the whole scope
[ ${#name} -le 120 ] || name=${name:0:100}_$(echo "$module ${funcs[*]:-}" | md5sum | cut -c1-12)
cfg=mutation/$name.toml session=mutation/$name.sqlite
cleanup() { :; }
if [ -n "${MUTATION_FORK:-}" ] && [ -z "${MUTATION_COUNT:-}" ]; then
  [ "${1:-} ${2:-} ${3:-}" = "python -m pytest" ] || { echo "bench/mutation.sh: MUTATION_FORK needs 'python -m pytest ARGS'" >&2; exit 2; }
  shift 3
  sock=/tmp/mmloom-mutation-$(echo "$PWD $name" | md5sum | cut -c1-12).sock  # AF_UNIX paths are short
  rm -f "$sock" "$sock.deadline"
  [ -n "${MUTATION_RESUME:-}" ] || rm -f "$sock.timeouts.log"
  echo 86400 >"$sock.deadline"  # the unmutated run is timed, not stopped
  python bench/forkserver.py "$sock" -- "$@" >"mutation/$name.fork.log" 2>&1 &  # logs: $sock.*.log
  fork_pid=$!
  cleanup() { python bench/forkserver.py --run "$sock" --stop >/dev/null 2>&1 || kill "$fork_pid" 2>/dev/null || true; }
  trap cleanup EXIT
  until [ -S "$sock" ]; do
    kill -0 "$fork_pid" 2>/dev/null || { cat "mutation/$name.fork.log" >&2; echo "bench/mutation.sh: the fork server's warm-up run failed" >&2; exit 2; }
    sleep 2
  done
  set -- python bench/forkserver.py --run "$sock" "$@"
fi
command=$(python -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@")  # cosmic-ray shlex.splits it
deadline=${MUTATION_DEADLINE:-280}
if [ -z "${MUTATION_COUNT:-}" ]; then
  start=$(date +%s)
  "$@" >"mutation/$name.baseline.log" 2>&1 || { tail -n 20 "mutation/$name.baseline.log" >&2
    echo "bench/mutation.sh: the test command fails on the unmutated code; fix it first" >&2; exit 2; }
  took=$(( $(date +%s) - start ))
  # a survivor runs every test: a deadline under three times the unmutated run's time (the
  # load varies) would stop survivors and count them as kills
  [ $((3 * took)) -le "$deadline" ] || deadline=$((3 * took))
  echo "unmutated run: ${took} s; each mutant's run is stopped after ${deadline} s (MUTATION_DEADLINE)"
  [ -z "${sock:-}" ] || echo "$deadline" >"$sock.deadline"
fi
DEADLINE=$deadline python - "$module" "$cfg" "$command" "${funcs[@]}" <<'PY'
import ast, json, sys
import os
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
        if f.replace("-", "").isdigit() and f.count("-") == 1:
            lines.append(f)
            continue
        if f not in found:
            sys.exit(f"bench/mutation.sh: no function or class {f} in {module}")
        lines.append("%d-%d" % found[f])
with open(cfg, "w") as fh:
    fh.write("[cosmic-ray]\n")
    fh.write(f"module-path = {json.dumps(module)}\ntimeout = {float(os.environ['DEADLINE']) + 30}\nexcluded-modules = []\n")
    fh.write(f"test-command = {json.dumps(command)}\n\n[cosmic-ray.distributor]\nname = \"local\"\n")
    if lines:
        fh.write(f"\n[cosmic-ray.filters.line-filter.lines]\n{json.dumps(module)} = {json.dumps(lines)}\n")
    exclude = [x for x in os.environ.get("MUTATION_EXCLUDE", "").split(",") if x]
    if exclude:
        fh.write(f"\n[cosmic-ray.filters.operators-filter]\nexclude-operators = {json.dumps(exclude)}\n")
PY
pending() {  # mutants of the session without a result yet
  python -c 'import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); print(db.execute("select count(*) from mutation_specs where job_id not in (select job_id from work_results)").fetchone()[0])' "$session"
}
source_id=$(git hash-object "$module")
if [ -n "${MUTATION_RESUME:-}" ] && [ -f "$session" ]; then
  # the mutants' positions are the module's at init: resume only on the same source
  [ "$(cat "mutation/$name.source" 2>/dev/null)" = "$source_id" ] || {
    echo "bench/mutation.sh: $module changed since $session was made; run without MUTATION_RESUME" >&2; exit 2; }
  echo "resuming $session: $(pending) mutant(s) left"
else
  rm -f "$session"
  cosmic-ray init "$cfg" "$session"
  echo "$source_id" >"mutation/$name.source"
  [ ${#funcs[@]} -eq 0 ] || cr-filter-lines --config "$cfg" "$session"
  cr-filter-pragma "$session"  # lines marked `# pragma: no mutate`
  [ -z "${MUTATION_EXCLUDE:-}" ] || cr-filter-operators "$session" "$cfg"
  [ -n "${MUTATION_KEEP_ANNOTATIONS:-}" ] || python bench/mutation_skip_annotations.py "$session"  # never evaluated: equivalent
fi
if [ -n "${MUTATION_COUNT:-}" ]; then
  echo "mutants: $(pending)"
  exit 0
fi
trap 'git checkout -- "$module"; cleanup' EXIT
cosmic-ray exec "$cfg" "$session"
cr-report "$session" --show-pending | tail -n 8
python - "$session" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute("select test_outcome, worker_outcome, count(*) from work_results group by 1, 2").fetchall()
count = {f"{t or w}".lower(): n for t, w, n in rows}
print("mutants: " + ", ".join(f"{k} {v}" for k, v in sorted(count.items())))
PY
# the fork server's client says so on stdout, which the session keeps with the mutant
python - "$session" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
stopped = [j for (j,) in db.execute("select job_id from work_results where output like '%forkserver: stopped at the %'")]
if stopped:
    print(f"of the killed, {len(stopped)} were stopped at the deadline, not failed (a loop, or a survivor too slow; "
          f"see each with cr-report --show-output): {' '.join(stopped)}")
PY
