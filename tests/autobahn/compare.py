#!/usr/bin/env python3
"""Autobahn (kosoku) result handling for tests/autobahn/run.sh. Standard library only.

Owns: turning kosoku's report directory (`index.json` + one JSON file per case) into the
normalised results file (case id -> behaviour, close behaviour), judging a run, and comparing
it with the committed `tests/autobahn/expected.json`. Never starts servers or kosoku.

Subcommands:
  normalize RESULTS_JSON REPORT_DIR...
                                      write the normalised results of one run (kosoku may
                                      have been run once per case group, one dir each)
  check RESULTS_JSON EXPECTED_JSON [--reports DIR]... [--update]
                                      print every case that is not OK and every difference
                                      from the expected file; exit 1 if a case failed or got
                                      worse than expected. --update rewrites EXPECTED_JSON
                                      from RESULTS_JSON first (a failed case still fails).

Verdict labels are Autobahn's, as kosoku writes them. A case *passes* when both verdicts are
OK, NON-STRICT or INFORMATIONAL (kosoku's own `CaseResult.passed` rule).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

SCHEMA_VERSION = 1

# Lower is better. INFORMATIONAL is as good as OK: those cases probe behaviour the RFC leaves
# open and can yield nothing else. A label not listed here ranks as a failure.
BEHAVIOR_RANK = {
    "OK": 0,
    "INFORMATIONAL": 0,
    "NON-STRICT": 1,
    "UNIMPLEMENTED": 2,
    "FAILED": 3,
    "ERROR": 3,
}
CLOSE_RANK = {
    "OK": 0,
    "INFORMATIONAL": 0,
    "NON-STRICT": 1,
    "WRONG CODE": 2,
    "UNCLEAN": 2,
    "FAILED BY CLIENT": 2,
    "NO_CLOSE": 3,
    "FAILED": 3,
}
RANK_UNKNOWN = 3
PASSING = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})

# Longest piece of a report's prose printed per case, in characters.
DETAIL_CHARS_MAX = 240


class ResultsError(Exception):
    """A results, expected or report file is missing or malformed: fix or regenerate that file."""


def case_sort_key(case_id: str) -> tuple[Any, ...]:
    """Numeric order by component (9.10 after 9.9); odd ids sort last, by text."""
    try:
        return (0, tuple(int(p) for p in case_id.split(".")))
    except ValueError:
        return (1, case_id)


def rank(table: dict[str, int], label: str) -> int:
    return table.get(label, RANK_UNKNOWN)


def passes(verdict: dict[str, str]) -> bool:
    return verdict["behavior"] in PASSING and verdict["behaviorClose"] in PASSING


def is_worse(got: dict[str, str], expected: dict[str, str]) -> bool:
    """True when either verdict ranks below the expected one."""
    return rank(BEHAVIOR_RANK, got["behavior"]) > rank(
        BEHAVIOR_RANK, expected["behavior"]
    ) or rank(CLOSE_RANK, got["behaviorClose"]) > rank(
        CLOSE_RANK, expected["behaviorClose"]
    )


def load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ResultsError(f"{path}: not found") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: cannot read JSON: {e}") from e


def load_cases(path: str) -> dict[str, dict[str, str]]:
    """Read a normalised results/expected file and return its case map, validated."""
    doc = load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), dict):
        raise ResultsError(f'{path}: expected an object with a "cases" object')
    cases: dict[str, dict[str, str]] = {}
    for case_id, verdict in doc["cases"].items():
        if (
            not isinstance(verdict, dict)
            or not isinstance(verdict.get("behavior"), str)
            or not isinstance(verdict.get("behaviorClose"), str)
        ):
            raise ResultsError(
                f'{path}: case {case_id}: needs string "behavior" and "behaviorClose"'
            )
        cases[case_id] = {
            "behavior": verdict["behavior"],
            "behaviorClose": verdict["behaviorClose"],
        }
    return cases


def render(cases: dict[str, dict[str, str]]) -> str:
    """The normalised file. No agent name: kosoku takes it from the server's `Server` header,
    else from host:port, which would change the expected file on every run."""
    doc = {
        "schema": SCHEMA_VERSION,
        "generator": "tests/autobahn/run.sh (kosoku 0.1.0 fuzzingclient)",
        "cases": {k: cases[k] for k in sorted(cases, key=case_sort_key)},
    }
    return json.dumps(doc, indent=2) + "\n"


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def normalize(report_dirs: list[str]) -> dict[str, dict[str, str]]:
    """Merge kosoku's `index.json` files ({agent: {case id: {behavior, behaviorClose, ...}}})."""
    cases: dict[str, dict[str, str]] = {}
    for report_dir in report_dirs:
        index = load_json(os.path.join(report_dir, "index.json"))
        if not isinstance(index, dict) or not index:
            raise ResultsError(f"{report_dir}/index.json: no agent in the index")
        for agent_cases in index.values():
            if not isinstance(agent_cases, dict):
                raise ResultsError(
                    f"{report_dir}/index.json: agent entry is not an object"
                )
            for case_id, entry in agent_cases.items():
                if not isinstance(entry, dict):
                    raise ResultsError(
                        f"{report_dir}/index.json: case {case_id} malformed"
                    )
                cases[case_id] = {
                    "behavior": str(entry.get("behavior")),
                    "behaviorClose": str(entry.get("behaviorClose")),
                }
    return cases


def clip(text: Any) -> str:
    s = " ".join(str(text)[: DETAIL_CHARS_MAX * 4].split())
    return s if len(s) <= DETAIL_CHARS_MAX else s[: DETAIL_CHARS_MAX - 3] + "..."


def find_report(report_dirs: list[str], case_id: str) -> dict[str, Any] | None:
    """The case's own kosoku report file, or None when no dir has it."""
    for report_dir in report_dirs:
        try:
            index = load_json(os.path.join(report_dir, "index.json"))
            for agent_cases in index.values():
                entry = agent_cases.get(case_id)
                if isinstance(entry, dict) and isinstance(entry.get("reportfile"), str):
                    rep = load_json(os.path.join(report_dir, entry["reportfile"]))
                    if isinstance(rep, dict):
                        return rep
        except (ResultsError, AttributeError):
            continue
    return None


def case_detail(report_dirs: list[str], case_id: str) -> str:
    """What the peer did, from the case's own report file; '' when unavailable."""
    rep = find_report(report_dirs, case_id)
    if rep is None:
        return ""
    parts = [f"expectation: {clip(rep.get('expectation'))}"]
    parts.append(f"result: {clip(rep.get('result'))}")
    expected = rep.get("expected")
    if isinstance(expected, dict) and "OK" in expected:
        parts.append(
            f"events received: {clip(rep.get('received'))}; "
            f"OK would be: {clip(expected['OK'])}"
        )
    if rep.get("resultClose") and rep.get("resultClose") != rep.get("result"):
        parts.append(f"close: {clip(rep.get('resultClose'))}")
    parts.append(
        "server close code {} reason {!r}, kosoku close code {}, clean={}".format(
            rep.get("remoteCloseCode"),
            clip(rep.get("remoteCloseReason") or ""),
            rep.get("localCloseCode"),
            rep.get("wasClean"),
        )
    )
    if rep.get("wasNotCleanReason"):
        parts.append(f"not clean because: {clip(rep.get('wasNotCleanReason'))}")
    return "\n".join("      " + p for p in parts)


def fmt_verdict(v: dict[str, str] | None) -> str:
    return "(absent)" if v is None else f"{v['behavior']}/{v['behaviorClose']}"


def check(
    got: dict[str, dict[str, str]],
    expected: dict[str, dict[str, str]],
    report_dirs: list[str],
    out: Any = sys.stdout,
) -> int:
    """Print the judgement of one run; return the process exit code (0 ok, 1 failed)."""
    counts: dict[str, int] = {}
    for v in got.values():
        counts[v["behavior"]] = counts.get(v["behavior"], 0) + 1
    order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED", "ERROR"]
    labels = order + sorted(set(counts) - set(order))
    print(
        f"autobahn: {len(got)} cases: "
        + ", ".join(f"{counts.get(k, 0)} {k}" for k in labels),
        file=out,
    )

    failing = [c for c in sorted(got, key=case_sort_key) if not passes(got[c])]
    non_strict = [
        c
        for c in sorted(got, key=case_sort_key)
        if passes(got[c]) and "NON-STRICT" in got[c].values()
    ]
    for title, ids in (
        ("FAILING cases", failing),
        ("NON-STRICT cases (they pass)", non_strict),
    ):
        if ids:
            print(f"{title}:", file=out)
            for c in ids:
                print(f"  {c}: {fmt_verdict(got[c])}", file=out)
                detail = case_detail(report_dirs, c)
                if detail:
                    print(detail, file=out)

    worse, diffs = [], []
    for c in sorted(set(got) | set(expected), key=case_sort_key):
        g, e = got.get(c), expected.get(c)
        if g == e:
            continue
        if g is None:
            worse.append(f"  WORSE   {c}: expected {fmt_verdict(e)}, case did not run")
        elif e is None:
            diffs.append(f"  new     {c}: {fmt_verdict(g)} (not in expected file)")
        elif is_worse(g, e):
            worse.append(f"  WORSE   {c}: {fmt_verdict(e)} -> {fmt_verdict(g)}")
        else:
            diffs.append(f"  changed {c}: {fmt_verdict(e)} -> {fmt_verdict(g)}")
    if worse or diffs:
        print("differences from the expected file:", file=out)
        for line in worse + diffs:
            print(line, file=out)
        if not worse:
            print(
                "  (none is worse; run tests/autobahn/run.sh --update to record them)",
                file=out,
            )
    else:
        print("autobahn: results match the expected file", file=out)

    bad = len(failing) + len(worse)
    print(
        f"autobahn: {len(failing)} failing case(s), {len(worse)} worse than expected",
        file=out,
    )
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("normalize", help="kosoku report dir -> normalised results")
    n.add_argument("results")
    n.add_argument("report_dirs", nargs="+")
    c = sub.add_parser("check", help="judge results against the expected file")
    c.add_argument("results")
    c.add_argument("expected")
    c.add_argument(
        "--reports",
        action="append",
        default=[],
        help="kosoku report dir, for per-case details (repeatable)",
    )
    c.add_argument(
        "--update", action="store_true", help="rewrite the expected file first"
    )
    args = parser.parse_args(argv)

    try:
        if args.cmd == "normalize":
            cases = normalize(args.report_dirs)
            write_atomic(args.results, render(cases))
            print(f"autobahn: wrote {len(cases)} case results to {args.results}")
            return 0
        got = load_cases(args.results)
        if args.update:
            write_atomic(args.expected, render(got))
            print(f"autobahn: rewrote {args.expected} with {len(got)} cases")
        if not os.path.exists(args.expected):
            raise ResultsError(
                f"{args.expected}: not found; create it with tests/autobahn/run.sh --update"
            )
        return check(got, load_cases(args.expected), args.reports, sys.stdout)
    except ResultsError as e:
        print(f"autobahn: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
