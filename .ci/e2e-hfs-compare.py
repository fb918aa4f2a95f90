#!/usr/bin/env python3
"""Compares what the proxy exported from a real FHIR server with what that server holds.

Used by .ci/e2e-hfs.sh. Arguments: HFS_URL PROXY_URL GROUP_ID OUT_DIR, where OUT_DIR holds one
directory per export saved by `backend_client` (BULK_OUT): system-types/ (system level with _type),
system-all/ (system level, no _type), patient/, group/.

The truth comes from the server itself, independently of the proxy's planning: every resource of
every type it lists in its CapabilityStatement, read by paging its searches (next links), and the
Patients each resource references anywhere (for the fixture, a resource is in a patient's
compartment exactly when it references the patient). Patient and Group exports also hold the
supporting resources (the proxy's default `export.supporting_types`) that the compartment's
resources reference, exactly those. Per type, `_summary=count` must agree with the paged reads.
Exits 1 with a list of differences when anything disagrees.
"""

import json
import re
import sys
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

PATIENT_REF = re.compile(r'"reference"\s*:\s*"(?:[^"]*/)?Patient/([^"/]+)"')
REFERENCE = re.compile(r'"reference"\s*:\s*"([^"]+)"')
# export.supporting_types' default.
SUPPORTING = ("Organization", "Practitioner", "PractitionerRole", "Location", "Medication")
TIMEOUT = 60


def get(url, accept="application/fhir+json"):
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.load(response)


def supporting_refs(hfs, resource):
    """The (type, id) of the supporting resources `resource` references on the server: relative, or
    absolute below its base (not contained, `urn:` or conditional references)."""
    found = set()
    for reference in REFERENCE.findall(json.dumps(resource)):
        reference = reference.removeprefix(hfs.rstrip("/") + "/")
        parts = reference.split("/")
        if ":" in reference or "?" in reference or "#" in reference or len(parts) not in (2, 4):
            continue
        if parts[0] in SUPPORTING and (len(parts) == 2 or parts[2] == "_history"):
            found.add((parts[0], parts[1]))
    return found


def server_truth(hfs):
    """{type: {id: set(patient ids referenced)}}, {type: {id: set((type, id) of the supporting
    resources referenced)}} and {type: _summary=count total}."""
    capability = get(f"{hfs}/metadata")
    types = sorted({r["type"] for rest in capability.get("rest", []) for r in rest.get("resource", [])})
    totals, resources, supporting = {}, {}, {}
    for resource_type in types:
        total = get(f"{hfs}/{resource_type}?_summary=count").get("total", 0)
        totals[resource_type] = total
        if not total:
            continue
        found, referencing = {}, {}
        url = f"{hfs}/{resource_type}?_count=1000"
        pages = 0
        while url:
            page = get(url)
            pages += 1
            for entry in page.get("entry", []):
                if entry.get("search", {}).get("mode", "match") != "match":
                    continue
                resource = entry["resource"]
                refs = set(PATIENT_REF.findall(json.dumps(resource)))
                if resource_type == "Patient":
                    refs.add(resource["id"])
                found[resource["id"]] = refs
                referencing[resource["id"]] = supporting_refs(hfs, resource)
            url = next((l["url"] for l in page.get("link", []) if l.get("relation") == "next"), None)
            if pages > 10000:
                raise SystemExit(f"{resource_type}: more than 10000 pages, giving up")
        resources[resource_type] = found
        supporting[resource_type] = referencing
    return resources, supporting, totals


def exported(directory):
    """{type: [ids]} from TYPE.N.ndjson files, and the error files' OperationOutcomes."""
    out, errors = defaultdict(list), []
    for path in sorted(Path(directory).glob("*.ndjson")):
        name = path.name.split(".")[0]
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            resource = json.loads(line)
            if name == "error":
                errors.append(resource)
            else:
                if resource["resourceType"] != name:
                    raise SystemExit(f"{path}: a {resource['resourceType']} in the {name} file")
                out[name].append(resource["id"])
    return out, errors


def compare(label, got, want, problems, report):
    """Exact equality of ids per type, no duplicates, no type missing or extra."""
    total = 0
    for resource_type in sorted(set(got) | set(want)):
        ids = got.get(resource_type, [])
        expected = want.get(resource_type, set())
        total += len(ids)
        if len(ids) != len(set(ids)):
            problems.append(f"{label}: {resource_type}: {len(ids) - len(set(ids))} duplicate ids")
        if set(ids) != expected:
            missing, extra = expected - set(ids), set(ids) - expected
            problems.append(
                f"{label}: {resource_type}: exported {len(set(ids))}, server has {len(expected)}"
                f" ({len(missing)} missing e.g. {sorted(missing)[:2]}, {len(extra)} extra e.g. {sorted(extra)[:2]})"
            )
    report.append(f"{label:<16} {total:>6} resources, {len(got):>3} types")
    return total


def main():
    hfs, proxy, group_id, out_dir = sys.argv[1:5]
    out_dir = Path(out_dir)
    problems, report = [], []
    truth, references, totals = server_truth(hfs)
    for resource_type, found in truth.items():
        if len(found) != totals[resource_type]:
            problems.append(
                f"server: {resource_type}: _summary=count says {totals[resource_type]}, paging read {len(found)}"
            )
    held = sum(totals.values())
    report.append(f"server           {held:>6} resources, {len(truth):>3} non-empty types (of {len(totals)} listed)")

    everything = {t: set(found) for t, found in truth.items()}

    def in_compartment(patients):
        """The patients' compartments, and the supporting resources those reference."""
        want = {}
        for resource_type, found in truth.items():
            ids = {i for i, refs in found.items() if refs & patients}
            if ids:
                want[resource_type] = ids
        referenced = defaultdict(set)
        for resource_type, ids in want.items():
            for i in ids:
                for t, target in references[resource_type][i]:
                    referenced[t].add(target)
        for t, ids in referenced.items():
            missing = ids - set(truth.get(t, {}))
            if missing:
                problems.append(f"server: {len(missing)} referenced {t} missing, e.g. {sorted(missing)[:2]}")
            want[t] = ids - missing
        return want

    all_patients = set(truth.get("Patient", {}))
    group = get(f"{proxy}/Group/{group_id}")
    members = {
        m["entity"]["reference"].split("/")[-1]
        for m in group.get("member", [])
        if m.get("entity", {}).get("reference", "").startswith("Patient/")
    }

    # System level, no _type: every resource of every type (SearchParameter definitions included).
    got, errors = exported(out_dir / "system-all")
    compare("system", got, everything, problems, report)
    problems += [f"system: error file: {json.dumps(e)[:300]}" for e in errors]

    # System level with _type: exactly the types asked for (the fixture's, see .ci/e2e-hfs.sh).
    types = set((out_dir / "system-types.types").read_text().split(","))
    got, errors = exported(out_dir / "system-types")
    compare("system+_type", got, {t: ids for t, ids in everything.items() if t in types}, problems, report)
    problems += [f"system+_type: error file: {json.dumps(e)[:300]}" for e in errors]

    # Patient level: every resource in some Patient's compartment, and what those reference of the
    # supporting types.
    got, errors = exported(out_dir / "patient")
    compare("Patient", got, in_compartment(all_patients), problems, report)
    problems += [f"Patient: error file: {json.dumps(e)[:300]}" for e in errors]

    # Group level: the members' compartments (and the supporting resources they reference), and the
    # Patients are exactly the members.
    got, errors = exported(out_dir / "group")
    compare(f"Group/{group_id}", got, in_compartment(members), problems, report)
    problems += [f"Group: error file: {json.dumps(e)[:300]}" for e in errors]
    if set(got.get("Patient", [])) != members or not members:
        problems.append(f"Group: exported Patients {len(got.get('Patient', []))} != {len(members)} members")

    # Passthrough: the proxy answers reads and searches as the server does.
    some_patient = sorted(all_patients)[0]
    for path in [f"Patient/{some_patient}", f"Group/{group_id}"]:
        if get(f"{hfs}/{path}") != get(f"{proxy}/{path}"):
            problems.append(f"passthrough: {path} differs from the server's answer")
    for resource_type in ("Observation", "Patient"):
        # A searchset Bundle has its own id and timestamp per request: compare the totals.
        path = f"{resource_type}?_summary=count"
        direct, proxied = get(f"{hfs}/{path}").get("total"), get(f"{proxy}/{path}").get("total")
        if direct != proxied:
            problems.append(f"passthrough: {path}: total {proxied}, server says {direct}")
    report.append("passthrough      Patient and Group reads, _summary=count searches: same as the server")

    # Metadata: the server's CapabilityStatement plus the bulk-data and SMART entries.
    capability = get(f"{proxy}/metadata")
    upstream = get(f"{hfs}/metadata")
    if capability.get("software") != upstream.get("software"):
        problems.append("metadata: software is not the upstream's")
    if "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data" not in capability.get("instantiates", []):
        problems.append("metadata: no bulk-data instantiates")
    security = json.dumps(capability.get("rest", [{}])[0].get("security", {}))
    if "oauth-uris" not in security:
        problems.append("metadata: no oauth-uris extension")
    smart = get(f"{proxy}/.well-known/smart-configuration", accept="application/json")
    if not smart.get("token_endpoint", "").endswith("/token"):
        problems.append("smart-configuration: no token_endpoint")
    report.append("metadata         upstream CapabilityStatement + bulk-data + SMART; smart-configuration ok")

    print("\n".join(report))
    if problems:
        print(f"\n{len(problems)} problem(s):")
        print("\n".join(f"  - {p}" for p in problems))
        sys.exit(1)
    print("\nevery export equals what the server holds")


if __name__ == "__main__":
    main()
