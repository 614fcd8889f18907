#!/usr/bin/env bash
# `make demo`: start the execution API, wait until its template is warm, then run the LLM tool loop
# (examples/chat_with_code.py) against a scripted stand-in model; the code it asks for runs in a real microVM.
# Everything it starts is stopped again by PID when it ends, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DEMO_DIR=${APPLIANCE_DEMO_DIR:-$HOME/.cache/appliance/demo}
export APPLIANCE_PATHS__STATE_DIR=$DEMO_DIR/state
export APPLIANCE_PATHS__RUN_DIR=/dev/shm/appliance-demo
export APPLIANCE_SERVICE__PORT=${APPLIANCE_DEMO_PORT:-8080}
export APPLIANCE_SERVICE__POOL_SIZE=1
MODEL_PORT=${APPLIANCE_DEMO_MODEL_PORT:-8765}
URL=http://127.0.0.1:$APPLIANCE_SERVICE__PORT

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

mkdir -p "$DEMO_DIR"
$BIN/appliance serve >"$DEMO_DIR.log" 2>&1 &
pids+=($!)
echo "appliance serve started (log: $DEMO_DIR.log); waiting for a warm template (imports pandas and sklearn once)..."
started=$(date +%s)
until $BIN/python -c "import httpx, sys; sys.exit(httpx.get('$URL/v1/readyz').status_code != 200)" 2>/dev/null; do
    kill -0 "${pids[0]}" 2>/dev/null || { echo "appliance serve exited:"; tail -5 "$DEMO_DIR.log"; exit 1; }
    [ $(( $(date +%s) - started )) -lt 300 ] || { echo "not ready after 300 s:"; tail -5 "$DEMO_DIR.log"; exit 1; }
    sleep 1
done
echo "ready after $(( $(date +%s) - started )) s"

$BIN/python examples/scripted_model.py --port "$MODEL_PORT" &
pids+=($!)
export APPLIANCE_URL=$URL
APPLIANCE_API_KEY=$(head -n1 "$APPLIANCE_PATHS__STATE_DIR/api-key")
export APPLIANCE_API_KEY
export OPENAI_BASE_URL=http://127.0.0.1:$MODEL_PORT/v1 OPENAI_API_KEY=scripted MODEL=scripted
echo "model> asks the sandbox to run pandas code through the run_python tool"
$BIN/python examples/chat_with_code.py "What is the sum of the column a = [1, 2, 3]?"
