#!/usr/bin/env bash
# Redis's own test files (7.0 branch, external mode) against `keymiss serve --server python` over
# the memory store. Not run by CI: it needs a Redis source tree (tests/ and runtest) and tclsh.
#
#   bench/redis_suite.sh REDIS_SRC [UNIT ...]
#
# REDIS_SRC is a checkout of redis 7.0 (e.g. `git archive 7.0.15 tests runtest | tar -x -C DIR`);
# the units default to unit/type/string unit/type/incr unit/expire. Each unit runs against a fresh
# keymiss server; the summary counts the [ok] and [err] lines and lists the failed tests.
set -u
src=${1:?usage: bench/redis_suite.sh REDIS_SRC [UNIT ...]}
shift
units=("$@")
[ ${#units[@]} -eq 0 ] && units=(unit/type/string unit/type/incr unit/expire)
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
out=$(mktemp -d)
# External mode starts each file with FLUSHALL and FUNCTION FLUSH; keymiss has no functions (nor
# scripts), so a copy of the tree drops the second line rather than the whole file failing there.
tree=$out/redis
mkdir -p "$tree"
cp -r "$src/tests" "$tree/" && cp "$src/runtest" "$tree/" 2>/dev/null
sed -i 's/^    r function flush$/    # r function flush (keymiss: no functions)/' "$tree/tests/support/server.tcl"
total_ok=0
total_err=0
for unit in "${units[@]}"; do
  port=$(
    "$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  )
  log=$out/$(echo "$unit" | tr / _)
  PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} "$python" -m keymiss serve --server python --store memory \
    --app bench.redis_suite_app:app --host 127.0.0.1 --port "$port" >"$log.server" 2>&1 &
  server=$!
  for _ in $(seq 100); do
    (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
    sleep 0.1
  done
  (cd "$tree" && TERM=dumb timeout 600 tclsh tests/test_helper.tcl --host 127.0.0.1 --port "$port" --singledb \
    --durable --ignore-encoding --ignore-digest --tags -needs:repl --tags -needs:debug --tags -needs:config-maxmemory \
    --timeout 60 --single "$unit") >"$log" 2>&1
  kill "$server" 2>/dev/null
  wait "$server" 2>/dev/null
  ok=$(grep -c '^\[ok\]' "$log")
  err=$(grep -cE '^\[(err|exception)\]' "$log")
  total_ok=$((total_ok + ok))
  total_err=$((total_err + err))
  echo "$unit: $ok passed, $err failed"
  grep -E '^\[(err|exception)\]' "$log" | sed 's/^/    /'
done
echo "total: $total_ok passed, $total_err failed (logs in $out)"
