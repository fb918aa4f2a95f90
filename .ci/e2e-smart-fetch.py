#!/usr/bin/env python3
"""Checks what smart-fetch (a third-party Bulk Data client, PyPI) exported through the proxy.

Used by .ci/e2e-hfs.sh. Arguments: SMART_FETCH_DIR REFERENCE_DIR, where SMART_FETCH_DIR is the
output folder of one `smart-fetch bulk` run (gzipped NDJSON and its log.ndjson) and REFERENCE_DIR
the same export made with `backend_client`, which e2e-hfs-compare.py checks against hfs itself.

smart-fetch chooses its own request: its log records the kick-off's `_type` and `_typeFilter`
(by default it asks for 15 types and filters Observation by category). The expected output is the
reference export's resources of those types that match those filters, each exactly as the
reference has it. Also checked: the client saw the export complete, no error file, and every
download it made finished. Exits 1 with the differences.
"""

import gzip
import json
import sys
import urllib.parse
from collections import defaultdict
from pathlib import Path


def read_ndjson(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def by_type(files):
    found = defaultdict(dict)
    for path in files:
        for resource in read_ndjson(path):
            key = resource["id"]
            if key in found[resource["resourceType"]]:
                raise SystemExit(f"{path}: {resource['resourceType']}/{key} appears twice")
            found[resource["resourceType"]][key] = resource
    return found


def type_filters(values):
    filters = defaultdict(list)
    for value in values:
        resource_type, _, query = value.partition("?")
        for param, wanted in urllib.parse.parse_qsl(query, keep_blank_values=True):
            if param not in ("category", "code"):
                raise SystemExit(f"_typeFilter {value!r}: this check knows only category and code")
            filters[resource_type].append((param, set(wanted.split(","))))
    return filters


def codes(resource, param):
    concepts = resource.get(param)
    if isinstance(concepts, dict):
        concepts = [concepts]
    return {
        coding.get("code")
        for concept in concepts or []
        for coding in concept.get("coding", [])
    }


def matches(resource, filters):
    return all(codes(resource, param) & wanted for param, wanted in filters)


def main(smart_fetch_dir, reference_dir):
    smart_fetch_dir, reference_dir = Path(smart_fetch_dir), Path(reference_dir)
    events = read_ndjson(smart_fetch_dir / "log.ndjson")
    ids = [e["eventId"] for e in events]
    problems = []
    kickoff = next((e["eventDetail"] for e in events if e["eventId"] == "kickoff"), None)
    if kickoff is None or kickoff.get("errorCode") is not None:
        raise SystemExit(f"smart-fetch: the kick-off failed: {kickoff}")
    if "export_complete" not in ids:
        problems.append(f"no export_complete event (events: {sorted(set(ids))})")
    for event in events:
        detail = event["eventDetail"]
        if event["eventId"] == "status_page_complete" and detail.get("errorFileCount"):
            problems.append(f"the manifest lists {detail['errorFileCount']} error files")
        if event["eventId"] == "error":
            problems.append(f"error event: {detail}")
    requested = sum(e["eventId"] == "download_request" for e in events)
    completed = sum(e["eventId"] == "download_complete" for e in events)
    if requested != completed:
        problems.append(f"{requested} downloads requested, {completed} completed")

    query = urllib.parse.parse_qs(urllib.parse.urlsplit(kickoff["exportUrl"]).query)
    types = {t for value in query.get("_type", []) for t in value.split(",")}
    filters = type_filters(query.get("_typeFilter", []))
    got = by_type(p for p in smart_fetch_dir.iterdir() if p.name.endswith((".ndjson", ".ndjson.gz"))
                  and p.name != "log.ndjson")
    reference = by_type(reference_dir.glob("*.ndjson"))
    for resource_type in sorted(types | set(got)):
        want = {
            key: resource
            for key, resource in reference.get(resource_type, {}).items()
            if resource_type in types and matches(resource, filters.get(resource_type, []))
        }
        have = got.get(resource_type, {})
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            problems.append(f"{resource_type}: {len(missing)} missing (e.g. {missing[:3]}), "
                            f"{len(extra)} unexpected (e.g. {extra[:3]})")
        changed = [key for key in set(want) & set(have) if want[key] != have[key]]
        if changed:
            problems.append(f"{resource_type}: {len(changed)} differ from the reference, e.g. {changed[:3]}")
    if problems:
        print("smart-fetch output differs:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    total = sum(len(v) for v in got.values())
    filtered = ", ".join(f"{t} by {', '.join(p for p, _ in f)}" for t, f in sorted(filters.items()))
    print(f"smart-fetch: {total} resources in {len(got)} types, exactly the reference's "
          f"({len(types)} types asked{', filtered: ' + filtered if filtered else ''})")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(*sys.argv[1:]))
