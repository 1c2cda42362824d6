#!/usr/bin/env bash
# `ray job submit` against a local `ray start --head`: the way the stages are submitted to a real
# cluster (README, "Submit the stages"), on this machine.
#
#   scripts/job_submit_local.sh            # VENV=.venv-cluster by default; OUT_DIR=/tmp/job-submit-XXXXXX
#
# 1. A separate venv with the `cluster` extra (ray[default]: the dashboard and its job server),
#    created once and reused while pyproject.toml is unchanged.
# 2. `ray start --head --num-cpus 2` on free ports, under a private temp dir, with token auth.
# 3. Two jobs with `--working-dir .`: prepare tiny synthetic data, then jobs/train_acr.py for one
#    epoch of a 2-block ViT. Each must end SUCCEEDED, and the training job's last line must be its
#    JSON summary with a checkpoint.
# 4. Always (trap): stop the cluster this script started, and only that one.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv-cluster}
PYTHON=${PYTHON:-python3.11}
log() { echo "[job_submit_local] $*"; }

# ------------------------------------------------------------------ 1. the venv
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
echo '*' > "$VENV/.gitignore"  # git ignores the venv without an edit to the repo's .gitignore
stamp="$VENV/.ray-wsss-install"
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
  log "pip install -e '.[cluster]' into $VENV"
  start=$(date +%s)
  "$VENV/bin/python" -m pip install --quiet -e '.[cluster]'
  echo "$wanted" > "$stamp"
  log "installed in $(( $(date +%s) - start )) s"
else
  log "reusing $VENV (installed for this pyproject.toml)"
fi
# Activate it: the job's entrypoint `python` is whatever the raylet finds on its PATH.
export PATH="$VENV/bin:$PATH"
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS
python -c "import ray, ray.dashboard, aiohttp; print('ray', ray.__version__, 'with the dashboard')"

# ------------------------------------------------------------------ 2. the cluster
# A private temp dir (short: Ray's socket paths have a length limit). `ray start` writes the
# cluster's address to <temp dir>/ray_current_cluster; under the default /tmp/ray, any bare
# `ray.init()` on this machine (a test run, say) would join this cluster instead of starting its own.
# RAY_TMPDIR makes it the default temp dir of every process of this cluster too: Ray code that looks
# the cluster up without an address (Train V2's placement-group cleaner, via the state API) finds
# this cluster's address file there, instead of failing with "Found multiple active Ray instances"
# while another Ray runs on the machine.
RAY_TMP=$(mktemp -d /tmp/rjsXXXXXX)
export RAY_TMPDIR="$RAY_TMP"
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/job-submit-XXXXXX)}
RAY_PID=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  # Not a plain `ray stop`: it has no address filter and stops every Ray process on the machine,
  # other users' and test sessions' clusters included. `ray start --block` runs in the foreground
  # of its own process and owns its node: SIGTERM to it stops exactly this cluster (it kills the
  # processes it started, as `ray stop` would, and its reaper takes the rest).
  if [ -n "$RAY_PID" ] && kill -0 "$RAY_PID" 2>/dev/null; then
    log "stopping the cluster this script started (ray start --block, pid $RAY_PID)"
    kill -TERM "$RAY_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$RAY_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$RAY_PID" 2>/dev/null && kill -KILL "$RAY_PID" 2>/dev/null || true
    wait "$RAY_PID" 2>/dev/null || true
  fi
  # Anything of this cluster still alive names the private temp dir on its command line.
  sleep 2
  local left
  left=$(pgrep -f -- "$RAY_TMP/" || true)
  if [ -n "$left" ]; then
    log "killing leftover processes of this cluster: $(echo $left)"
    for pid in $left; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  if [ "$rc" -eq 0 ]; then rm -rf "$RAY_TMP"; else log "cluster logs kept under $RAY_TMP/ray/session_latest/logs"; fi
  log "exit status $rc"
  exit "$rc"
}
trap cleanup EXIT INT TERM

# Token auth. Ray 2.60 turns token auth on for a new local cluster (`ray.init()`), and `ray start`
# turns it on when RAY_AUTH_MODE=token is set or ~/.ray/auth_token exists. We set it explicitly,
# with a fresh token of our own (RAY_AUTH_TOKEN_PATH takes precedence over ~/.ray/auth_token, which
# stays untouched): `ray start` and every process of the cluster (the job drivers too) inherit
# both variables, and the `ray job` CLI sends "Authorization: Bearer <token>" to the dashboard only
# because its own environment says RAY_AUTH_MODE=token. Without that header a token-auth dashboard
# answers 401; with RAY_AUTH_MODE=disabled everything works unauthenticated (not done here).
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$RAY_TMP/auth_token"
(umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")

# Free ports for everything with a fixed default (another Ray here may hold 10001, 52365, ...).
read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_HTTP_PORT AGENT_GRPC_PORT RUNTIME_ENV_PORT METRICS_PORT < <(python - <<'EOF'
import socket
socks = [socket.socket() for _ in range(7)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
ADDR="http://127.0.0.1:$DASH_PORT"
log "ray start --head: GCS port $GCS_PORT, dashboard $ADDR, temp dir $RAY_TMP/ray, outputs $OUT_DIR"
ray start --head --block --num-cpus 2 --port "$GCS_PORT" \
  --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
  --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_HTTP_PORT" \
  --dashboard-agent-grpc-port "$AGENT_GRPC_PORT" --runtime-env-agent-port "$RUNTIME_ENV_PORT" \
  --metrics-export-port "$METRICS_PORT" --temp-dir "$RAY_TMP/ray" \
  > "$RAY_TMP/ray_start.log" 2>&1 &
RAY_PID=$!

deadline=$(( $(date +%s) + 180 ))
until ray job list --address "$ADDR" > /dev/null 2>&1; do
  if ! kill -0 "$RAY_PID" 2>/dev/null || [ "$(date +%s)" -gt "$deadline" ]; then
    log "the cluster did not come up; ray start said:"
    cat "$RAY_TMP/ray_start.log"
    exit 1
  fi
  sleep 2
done
log "job server is up at $ADDR"
# The same request without the token: the dashboard must refuse it (token auth is really on).
unauthenticated=$(python -c "import sys, urllib.request, urllib.error
try:
    print(urllib.request.urlopen(sys.argv[1] + '/api/jobs/').status)
except urllib.error.HTTPError as err:
    print(err.code)" "$ADDR")
log "GET /api/jobs/ without the token -> HTTP $unauthenticated"
[ "$unauthenticated" = 401 ] || { log "expected 401 from a token-auth dashboard"; exit 1; }

# ------------------------------------------------------------------ 3. the jobs
# RAY_ADDRESS for the job's actors too (the driver gets it from the job server anyway): Train V2's
# placement-group cleaner looks the cluster up without an address, and with another Ray running on
# this machine it warns "Found multiple active Ray instances" every second without it.
RUNTIME_ENV=$(printf '{"excludes": [".venv", ".venv-cluster", "runs", ".git"], "env_vars": {"RAY_ADDRESS": "127.0.0.1:%s"}}' "$GCS_PORT")
RUN_ID="$(date +%H%M%S)-$$"

run_job() {  # run_job NAME ENTRYPOINT...: submit, wait, require SUCCEEDED, keep the logs in OUT_DIR
  local name=$1; shift
  local id="$name-$RUN_ID"
  log "ray job submit ($id): $*"
  local rc=0
  ray job submit --address "$ADDR" --submission-id "$id" --working-dir . \
    --runtime-env-json "$RUNTIME_ENV" -- "$@" || rc=$?
  # `ray job submit` exits 1 only for FAILED (a STOPPED job exits 0): ask for the status itself.
  local status
  status=$(python -c "import sys; from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)" "$ADDR" "$id")
  ray job logs --address "$ADDR" "$id" > "$OUT_DIR/$name.log" 2>&1
  if [ "$rc" -ne 0 ] || [ "$status" != SUCCEEDED ]; then
    log "job $id ended $status (ray job submit exit status $rc)"
    return 1
  fi
  log "job $id: status $status, ray job submit exit status $rc; its logs: $OUT_DIR/$name.log"
}

run_job prepare python jobs/prepare_data.py --out "$OUT_DIR/data" \
  --num-train 16 --num-val 8 --min-size 32 --max-size 48 --batch-size 8

run_job train python jobs/train_acr.py --data "$OUT_DIR/data" --out "$OUT_DIR/train" --epochs 1 \
  --model vit_tiny_patch16_224 --depth 2 --embed-dim 64 --num-heads 2 --img-size 32 --patch-size 8 \
  --batch-size 8 --warmup-epochs 0 --num-workers 1 --cpus-per-worker 1 --max-failures 0

# Every job's last stdout line is its JSON summary (jobs/_cli.py print_summary).
summary=$(grep '^{' "$OUT_DIR/train.log" | tail -n 1)
log "final JSON line of the training job:"
echo "$summary"
python - "$summary" "$OUT_DIR/train" <<'EOF'
import json, os, sys
summary, out = json.loads(sys.argv[1]), sys.argv[2]
assert summary["stage"] == "train" and summary["epochs"] == 1, summary
assert os.path.isfile(os.path.join(summary["checkpoint"], "model.pt")), summary["checkpoint"]
assert os.path.isfile(os.path.join(out, "_SUCCESS")), out
print(f"[job_submit_local] OK: checkpoint {summary['checkpoint']}, losses {summary['losses']}")
EOF
