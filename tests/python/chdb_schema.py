"""Runs Tally's ClickHouse statements on a current ClickHouse engine (chdb, in process).

Reads JSON from stdin: {"statements": [sql, ...], "checks": [[sql, expected_tsv], ...]}.
Applies the statements in order, then runs each check and compares its TSV output (trimmed).
Prints chdb's ClickHouse version; exits 1 at the first failure, naming it.
"""
import json
import sys

import chdb
from chdb import session


def main() -> int:
    job = json.load(sys.stdin)
    s = session.Session()
    print("chdb", chdb.__version__, "ClickHouse", s.query("SELECT version()", "TSV").bytes().decode().strip())
    for sql in job["statements"]:
        try:
            s.query(sql)
        except Exception as e:  # noqa: BLE001 - report any engine error with its statement
            print(f"FAILED statement:\n{sql}\n-> {e}")
            return 1
    for sql, want in job["checks"]:
        try:
            got = s.query(sql, "TSV").bytes().decode().strip()
        except Exception as e:  # noqa: BLE001
            print(f"FAILED check:\n{sql}\n-> {e}")
            return 1
        if got != want:
            print(f"WRONG check:\n{sql}\n-> {got!r}, want {want!r}")
            return 1
    print(f"{len(job['statements'])} statements and {len(job['checks'])} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
