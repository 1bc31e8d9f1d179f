#!/usr/bin/env bash
# Checks the monitoring files in contrib/: the Prometheus alerting rules
# (`promtool check rules`), their unit tests (`promtool test rules`) and the Grafana dashboard
# (valid JSON, every query non-empty and valid PromQL, no hard-coded data source). Last, it
# prints each dynamodb_cdc_* metric name that the rules and the dashboard use, one
# `metric: NAME` line each (a histogram's _bucket/_sum/_count as its base name), for
# comparison with what /metrics serves.
#
# promtool comes from Debian's prometheus package: `apt-get download` (no root needed) and
# `dpkg-deb -x`, promtool alone kept in $CACHE_DIR/promtool/ for the next run. Without apt,
# the rules get a structural check in Python (PyYAML in $CACHE_DIR/check-venv) and the unit
# tests do not run: a WARNING says so.
#
# Environment:
#   PROMTOOL=/path/to/promtool   use this promtool (no download)
#   REQUIRE_PROMTOOL=1           fail instead of falling back to the Python check
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dynamodb-cdc"
RULES=contrib/prometheus/alerts.yml
TESTS=contrib/prometheus/alerts.test.yml
DASHBOARD=contrib/grafana/dynamodb-cdc.json

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

say() { printf 'check.sh: %s\n' "$*" >&2; }

# Prints the path of a working promtool, or returns 1 (with the reason on stderr).
get_promtool() {
    if [[ -n "${PROMTOOL:-}" ]]; then
        "$PROMTOOL" --version >/dev/null 2>&1 || { say "PROMTOOL=$PROMTOOL does not run"; return 1; }
        printf '%s\n' "$PROMTOOL"
        return 0
    fi
    local cached="$CACHE_DIR/promtool/promtool"
    if [[ -x $cached ]] && "$cached" --version >/dev/null 2>&1; then
        printf '%s\n' "$cached"
        return 0
    fi
    if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
        say "no apt-get/dpkg-deb on this machine: cannot fetch Debian's promtool"
        return 1
    fi
    say "fetching promtool: apt-get download prometheus (once; cached in $CACHE_DIR/promtool)"
    mkdir -p "$tmp/deb"
    if ! (cd "$tmp/deb" && apt-get download -q prometheus) >"$tmp/apt.log" 2>&1; then
        # A machine that never ran `apt-get update` has no package lists. Updating them
        # needs root; nothing else here does.
        if [[ $(id -u) -eq 0 ]]; then
            say "apt-get download failed; running apt-get update once and retrying"
            apt-get update -q >>"$tmp/apt.log" 2>&1 || true
            (cd "$tmp/deb" && apt-get download -q prometheus) >>"$tmp/apt.log" 2>&1 || true
        fi
    fi
    local deb
    deb=$(find "$tmp/deb" -maxdepth 1 -name 'prometheus_*.deb' -print -quit)
    if [[ -z $deb ]]; then
        sed 's/^/  apt: /' "$tmp/apt.log" >&2
        say "apt-get download prometheus failed (no package lists? run apt-get update as root)"
        return 1
    fi
    dpkg-deb -x "$deb" "$tmp/root"
    if [[ ! -x $tmp/root/usr/bin/promtool ]]; then
        say "$(basename "$deb") has no usr/bin/promtool"
        return 1
    fi
    mkdir -p "$CACHE_DIR/promtool"
    cp "$tmp/root/usr/bin/promtool" "$CACHE_DIR/promtool/promtool.$$"
    mv -f "$CACHE_DIR/promtool/promtool.$$" "$cached"
    "$cached" --version >/dev/null 2>&1 || { say "the downloaded promtool does not run"; return 1; }
    printf '%s\n' "$cached"
}

# Prints a python that has PyYAML: a venv of its own in the cache (not localstack's
# $CACHE_DIR/venv), made once.
get_python_yaml() {
    local venv="$CACHE_DIR/check-venv"
    if [[ -x $venv/bin/python ]] && "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
        printf '%s\n' "$venv/bin/python"
        return 0
    fi
    say "creating $venv with PyYAML (once)"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q PyYAML >&2 || {
        say "could not create a venv with PyYAML"
        return 1
    }
    printf '%s\n' "$venv/bin/python"
}

# --- Prometheus rules -----------------------------------------------------------------------
if promtool=$(get_promtool); then
    echo "promtool: $("$promtool" --version 2>&1 | head -n 1)"
    "$promtool" check rules "$RULES"
    "$promtool" test rules "$TESTS"
else
    if [[ ${REQUIRE_PROMTOOL:-} == 1 ]]; then
        say "FAILED: no promtool and REQUIRE_PROMTOOL=1"
        exit 1
    fi
    promtool=
    say "WARNING: no promtool. Only a structural check of $RULES follows (PyYAML);"
    say "WARNING: PromQL is not parsed and the unit tests in $TESTS do NOT run."
    python=$(get_python_yaml)
    "$python" - "$RULES" "$TESTS" <<'EOF'
import sys, yaml

rules_path, tests_path = sys.argv[1], sys.argv[2]
errors = []
doc = yaml.safe_load(open(rules_path))
groups = doc.get("groups") if isinstance(doc, dict) else None
if not groups:
    sys.exit(f"{rules_path}: no groups")
names = set()
for g in groups:
    for i, r in enumerate(g.get("rules") or []):
        where = f"{rules_path}: group {g.get('name')!r} rule {i + 1}"
        name = r.get("alert")
        if not isinstance(name, str) or not name:
            errors.append(f"{where}: no alert name")
            continue
        where += f" ({name})"
        names.add(name)
        if not str(r.get("expr") or "").strip():
            errors.append(f"{where}: empty expr")
        if "for" not in r:
            errors.append(f"{where}: no for")
        if (r.get("labels") or {}).get("severity") not in ("warning", "critical"):
            errors.append(f"{where}: labels.severity is not warning or critical")
        ann = r.get("annotations") or {}
        for key in ("summary", "description"):
            if not str(ann.get(key) or "").strip():
                errors.append(f"{where}: no annotations.{key}")
if not any(g.get("name") == "dynamodb-cdc" for g in groups):
    errors.append(f"{rules_path}: no group named dynamodb-cdc")
tests = yaml.safe_load(open(tests_path))
for t in tests.get("tests") or []:
    for a in t.get("alert_rule_test") or []:
        if a.get("alertname") not in names:
            errors.append(f"{tests_path}: test of unknown alert {a.get('alertname')!r}")
for e in errors:
    print(e, file=sys.stderr)
if errors:
    sys.exit(1)
print(f"{rules_path}: {len(names)} alerts, structure OK (promtool not run)")
EOF
fi

# --- Grafana dashboard ----------------------------------------------------------------------
python3 -m json.tool "$DASHBOARD" >/dev/null
# Checks the dashboard, and writes its queries as recording rules (Grafana's variables
# replaced) so that promtool parses them.
python3 - "$DASHBOARD" "$tmp/dashboard-rules.yml" <<'EOF'
import json, re, sys

path, rules_out = sys.argv[1], sys.argv[2]
d = json.load(open(path))
errors = []
if d.get("title") != "dynamodb-cdc":
    errors.append(f"title is {d.get('title')!r}, not 'dynamodb-cdc'")
if not d.get("uid"):
    errors.append("no uid")
variables = {v.get("name"): v for v in (d.get("templating") or {}).get("list") or []}
if (variables.get("datasource") or {}).get("type") != "datasource":
    errors.append("no datasource variable named 'datasource'")

def walk(node, where):
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and "uid" in ds and ds["uid"] not in ("${datasource}", "-- Grafana --"):
            errors.append(f"{where}: hard-coded datasource uid {ds['uid']!r}")
        for k, v in node.items():
            walk(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            walk(v, f"{where}[{i}]")
walk(d, "$")

exprs, ids = [], set()
for p in d.get("panels") or []:
    title = p.get("title")
    if p.get("id") in ids:
        errors.append(f"panel {title!r}: duplicate id {p.get('id')}")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    if not p.get("targets"):
        errors.append(f"panel {title!r}: no targets")
    for t in p.get("targets") or []:
        expr = t.get("expr")
        if not isinstance(expr, str) or not expr.strip():
            errors.append(f"panel {title!r} target {t.get('refId')}: empty expr")
        else:
            exprs.append((title, expr))
for name in ("instance", "table"):
    v = variables.get(name)
    if v is None:
        errors.append(f"no {name} variable")
        continue
    q = v.get("query")
    q = q.get("query") if isinstance(q, dict) else q
    if not q or not v.get("multi") or not v.get("includeAll"):
        errors.append(f"variable {name}: needs a query, multi and includeAll")
for e in errors:
    print(f"{path}: {e}", file=sys.stderr)
if errors:
    sys.exit(1)

subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
         "${instance}": ".*", "$instance": ".*", "${table}": ".*", "$table": ".*"}
with open(rules_out, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, expr) in enumerate(exprs):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        if "$" in expr:
            sys.exit(f"{path}: panel {title!r}: unknown variable in {expr!r}")
        f.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(expr)}\n")
print(f"{path}: {len(d['panels'])} panels, {len(exprs)} queries, JSON OK")
EOF
if [[ -n $promtool ]]; then
    echo "dashboard queries (as recording rules):"
    "$promtool" check rules "$tmp/dashboard-rules.yml"
fi

# --- Metric names ---------------------------------------------------------------------------
python3 - "$RULES" "$DASHBOARD" <<'EOF'
import re, sys

names = set()
for path in sys.argv[1:]:
    for m in re.findall(r"dynamodb_cdc_[a-z_]+", open(path).read()):
        m = re.sub(r"_(bucket|sum|count)$", "", m)
        if not m.endswith("_"):
            names.add(m)
for n in sorted(names):
    print(f"metric: {n}")
EOF
