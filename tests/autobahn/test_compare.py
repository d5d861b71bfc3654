#!/usr/bin/env python3
"""Unit tests of compare.py (the Autobahn judge): `python3 -m unittest tests/autobahn/test_compare.py`.

They feed it hand-made kosoku report directories and expected files, so a judge that lets a
regression or a failed case through is caught without running kosoku or the server.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare


def verdict(behavior: str, close: str = "OK") -> dict[str, str]:
    return {"behavior": behavior, "behaviorClose": close}


class Judge(unittest.TestCase):
    def run_check(self, got, expected):
        out = io.StringIO()
        rc = compare.check(got, expected, [], out)
        return rc, out.getvalue()

    def test_identical_ok_passes(self):
        cases = {"1.1.1": verdict("OK"), "6.4.1": verdict("NON-STRICT")}
        rc, out = self.run_check(cases, dict(cases))
        self.assertEqual(rc, 0, out)
        self.assertIn("results match", out)
        self.assertIn("6.4.1", out)  # NON-STRICT cases are always listed

    def test_failed_case_fails_even_when_expected(self):
        cases = {"9.3.1": verdict("FAILED", "FAILED")}
        rc, out = self.run_check(cases, dict(cases))
        self.assertEqual(rc, 1)
        self.assertIn("FAILING cases", out)
        self.assertIn("9.3.1", out)

    def test_close_verdict_alone_fails(self):
        rc, out = self.run_check(
            {"7.1.5": verdict("OK", "WRONG CODE")},
            {"7.1.5": verdict("OK", "WRONG CODE")},
        )
        self.assertEqual(rc, 1, out)

    def test_regression_to_non_strict_fails(self):
        rc, out = self.run_check({"3.2": verdict("NON-STRICT")}, {"3.2": verdict("OK")})
        self.assertEqual(rc, 1)
        self.assertIn("WORSE   3.2: OK/OK -> NON-STRICT/OK", out)

    def test_improvement_is_printed_not_failed(self):
        rc, out = self.run_check({"3.2": verdict("OK")}, {"3.2": verdict("NON-STRICT")})
        self.assertEqual(rc, 0)
        self.assertIn("changed 3.2: NON-STRICT/OK -> OK/OK", out)

    def test_case_missing_from_run_is_worse(self):
        rc, out = self.run_check({}, {"2.1": verdict("OK")})
        self.assertEqual(rc, 1)
        self.assertIn("case did not run", out)

    def test_new_case_is_printed(self):
        rc, out = self.run_check(
            {"2.1": verdict("OK"), "2.2": verdict("OK")}, {"2.1": verdict("OK")}
        )
        self.assertEqual(rc, 0)
        self.assertIn("new     2.2", out)

    def test_unknown_label_counts_as_failure(self):
        rc, _ = self.run_check({"1.1.1": verdict("WEIRD")}, {"1.1.1": verdict("OK")})
        self.assertEqual(rc, 1)

    def test_numeric_case_order(self):
        ids = ["9.10.1", "9.2.1", "10.1.1", "9.9.1"]
        self.assertEqual(
            sorted(ids, key=compare.case_sort_key),
            ["9.2.1", "9.9.1", "9.10.1", "10.1.1"],
        )


class Files(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def main(self, argv):
        """compare.main with its output captured, so an error these tests provoke on purpose is
        checked here instead of printed as `autobahn: error:` in a passing run."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = compare.main(argv)
        self.out, self.err = out.getvalue(), err.getvalue()
        return rc

    def write(self, name, doc):
        path = os.path.join(self.dir, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        return path

    def test_normalize_then_update_then_check(self):
        reports = os.path.join(self.dir, "reports")
        os.mkdir(reports)
        with open(os.path.join(reports, "index.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "switchboard": {
                        "1.1.1": {
                            "behavior": "OK",
                            "behaviorClose": "OK",
                            "reportfile": "a.json",
                        },
                        "9.3.1": {
                            "behavior": "NON-STRICT",
                            "behaviorClose": "OK",
                            "reportfile": "b.json",
                        },
                    }
                },
                f,
            )
        with open(os.path.join(reports, "b.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "expectation": "echo",
                    "result": "slow",
                    "received": [],
                    "expected": {"OK": []},
                },
                f,
            )
        results = os.path.join(self.dir, "results.json")
        expected = os.path.join(self.dir, "expected.json")
        self.assertEqual(self.main(["normalize", results, reports]), 0)
        with open(results, encoding="utf-8") as f:
            doc = json.load(f)
        self.assertEqual(list(doc["cases"]), ["1.1.1", "9.3.1"])
        # No expected file yet: an error, not a silent pass.
        self.assertEqual(self.main(["check", results, expected]), 2)
        self.assertIn("expected.json: not found; create it with", self.err)
        self.assertEqual(self.main(["check", "--update", results, expected]), 0)
        self.assertIn("results match the expected file", self.out)
        self.assertEqual(self.err, "")
        self.assertEqual(compare.load_cases(expected), compare.load_cases(results))
        self.assertIn("result: slow", compare.case_detail([reports], "9.3.1"))

    def test_normalize_merges_group_dirs(self):
        dirs = []
        for group, case_id, behavior in (
            ("1", "1.1.1", "OK"),
            ("9", "9.1.1", "FAILED"),
        ):
            d = os.path.join(self.dir, group)
            os.mkdir(d)
            with open(os.path.join(d, "index.json"), "w", encoding="utf-8") as f:
                json.dump(
                    {"sb": {case_id: {"behavior": behavior, "behaviorClose": "OK"}}}, f
                )
            dirs.append(d)
        cases = compare.normalize(dirs)
        self.assertEqual(cases, {"1.1.1": verdict("OK"), "9.1.1": verdict("FAILED")})

    def test_malformed_expected_is_an_error(self):
        results = self.write("results.json", {"cases": {"1.1.1": verdict("OK")}})
        expected = self.write("expected.json", {"cases": {"1.1.1": {"behavior": 1}}})
        self.assertEqual(self.main(["check", results, expected]), 2)
        self.assertIn('needs string "behavior"', self.err)

    def test_missing_index_is_an_error(self):
        self.assertEqual(
            self.main(["normalize", os.path.join(self.dir, "r.json"), self.dir]), 2
        )
        self.assertIn("index.json: not found", self.err)


if __name__ == "__main__":
    unittest.main()
