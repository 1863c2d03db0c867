"""Hand-written mutants of the mechanisms issue 15 names, each run against its targeted
tests (the table in bench/mutants.yaml): prints KILLED or SURVIVED per mutant (the file is
restored after each).

    ./dev python bench/mutants.py [NAME-SUBSTRING...]

Each mutant replaces one exact snippet (which must occur once) with a wrong one, the way a
slip in an edit would; bench/mutation.sh runs cosmic-ray's exhaustive operators instead."""

import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# name, file, snippet, mutant, tests (pytest args)[, equivalent: why a survivor is harmless]
MUTANTS = [(m["name"], m["file"], m["snippet"], m["mutant"], m["tests"], *([m["equivalent"]] if "equivalent" in m else []))
           for m in yaml.safe_load((ROOT / "bench" / "mutants.yaml").read_text())]


def main(selected: list[str]) -> int:
    survived = 0
    for name, rel, old, new, tests, *equivalent in MUTANTS:
        if selected and not any(s.lower() in name.lower() for s in selected):
            continue
        path = ROOT / rel
        text = path.read_text()
        if text.count(old) != 1:
            print(f"STALE     {name}: the snippet occurs {text.count(old)} times in {rel}")
            survived += 1
            continue
        path.write_text(text.replace(old, new))
        start = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
        finally:
            path.write_text(text)
        verdict = "KILLED" if r.returncode == 1 else "SURVIVED" if r.returncode == 0 else f"ERROR {r.returncode}"
        note = f" [{equivalent[0]}]" if equivalent else ""
        survived += verdict != "KILLED" and not (verdict == "SURVIVED" and equivalent)
        print(f"{verdict:9} {name} ({time.time() - start:.0f} s){note}", flush=True)
        if verdict.startswith("ERROR"):
            print(r.stdout[-2000:], r.stderr[-2000:])
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
