#!/usr/bin/env bash
# Submit `csl <command> --config CONFIG run.name=RUN [KEY=VALUE ...]` as a Ray job.
#
#   cluster/ray/submit.sh [--address URL] [--command pipeline|train] [--no-wait] [--dry-run] \
#       CONFIG RUN_NAME [KEY=VALUE ...]
#
# Why a script: the run name must appear twice and agree (in run.name, which is the resume
# key, and in the submission id, which is how a person finds the job), and each submission
# needs a fresh submission id while the run name stays the same. Resubmitting with the same
# RUN_NAME (and the same run.storage) resumes the run from its latest complete checkpoint.
#
# The Jobs API address comes from --address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS,
# else http://127.0.0.1:8265. With token authentication on (Ray's default for new clusters),
# `ray job` reads the token from RAY_AUTH_TOKEN or ~/.ray/auth_token (RAY_AUTH_MODE=token).
set -euo pipefail

address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
command="pipeline"
wait_flag=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) address="$2"; shift 2 ;;
    --command) command="$2"; shift 2 ;;
    --no-wait) wait_flag="--no-wait"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) echo "submit.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "usage: submit.sh [--address URL] [--command pipeline|train] [--no-wait] [--dry-run] CONFIG RUN_NAME [KEY=VALUE ...]" >&2
  exit 2
fi
case "$command" in pipeline|train) ;; *) echo "submit.sh: --command must be pipeline or train, got $command" >&2; exit 2 ;; esac
config="$1"; run_name="$2"; shift 2
for kv in "$@"; do
  if [[ "$kv" == run.name=* ]]; then
    echo "submit.sh: give the run name as RUN_NAME, not as $kv" >&2; exit 2
  fi
done
# Submission ids must be unique per cluster; the run name is the stable part.
submission_id="${run_name}-$(date -u +%Y%m%d-%H%M%S)"
here="$(cd "$(dirname "$0")" && pwd)"

cmd=(ray job submit --address "$address" --submission-id "$submission_id"
     --working-dir . --runtime-env "$here/runtime_env.yaml" $wait_flag
     -- csl "$command" --config "$config" "run.name=$run_name" "$@")
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
echo "submission id: $submission_id  (logs: ray job logs --address $address --follow $submission_id)" >&2
exec "${cmd[@]}"
