#!/usr/bin/env bash
# The body of every training batch script in slurm/ (train.sbatch, jrt-360m-30b.sbatch,
# jrt-1.3b-50b.sbatch exec it). Run inside a Slurm batch job, never submitted by itself:
#
#   sbatch --nodes 4 slurm/train.sbatch configs/jrt-1.3b.yaml --set data.data_dir=data/shards
#
# Arguments: CONFIG [--set SECTION.KEY=VALUE ...] (also `--config CONFIG`), as jrt-train takes.
# Environment (pass with `sbatch --export=ALL,NAME=value` or export before sbatch):
#   JRT_CONFIG, JRT_SET   config and whitespace-separated KEY=VALUE overrides when not given as
#                         arguments (`--export=ALL,JRT_SET="training.train_steps=1000 ..."`);
#                         arguments win over JRT_SET, the last of a key wins
#   JRT_PYTHON            the Python that has megatron_jrt (default python3); used to resolve
#                         the config in the batch shell, and by the default trainer command
#   JRT_TRAIN             the trainer command each task runs, split on spaces (default
#                         "$JRT_PYTHON -m megatron_jrt.train"); e.g.
#                         "apptainer exec --nv jrt.sif python3 -m megatron_jrt.train" (and
#                         JRT_PYTHON="apptainer exec jrt.sif python3")
#   JRT_SRUN_ARGS         extra srun options, split on spaces (e.g. "--container-image=...")
#   JRT_MAX_RETRIES       crashes retried in a row without a new checkpoint (default 3)
#   JRT_REQUEUE_HOLD      1: requeue held (`scontrol requeuehold`), so a person can change the
#                         job (`scontrol update JobId=N NumNodes=...`) and `scontrol release` it
#   JRT_STOP_WAIT         seconds srun waits for the other tasks once the first one ended,
#                         before it kills them (default 120; see "srun" below)
#
# One attempt = the first start of the job, or a start after a requeue (same job id,
# SLURM_RESTART_COUNT + 1):
#   1. Resolve and validate the config for this allocation's world size, in the batch shell
#      (a config error stops the job here, exit 2, before any GPU is touched).
#   2. Append everything to <logging.run_dir>/slurm-<jobid>.out (until then: sbatch's own
#      --output file). rank 0 of the trainer also appends its console to <run_dir>/train.log.
#   3. srun one trainer per task. Ranks, world size and the master come from Slurm's
#      variables (megatron_jrt.distributed.read_launch_env); MASTER_ADDR is set here to the
#      first node's address, MASTER_PORT is left to the trainer (derived from the job id).
#   4. Act on the trainer's exit code (megatron_jrt/errors.py; <run_dir>/exit.json):
#        0  trained to training.train_steps: the job ends, no requeue
#        10 stopped by SIGUSR1/SIGTERM after a checkpoint: requeue (resume=auto), unless this
#           shell itself got SIGTERM (scancel, preemption: Slurm decides then) or the job's
#           requeue is off (`scontrol update JobId=N Requeue=0`: how a person ends a run)
#        2, 3, 4, 5, 11, 130: not retried (a person must act; see `no_retry_reason`)
#        anything else (1, a signal, a node gone): a crash, retried by requeueing up to
#           JRT_MAX_RETRIES times in a row without a new checkpoint, then the job stops
set -uo pipefail
# The rest of this file is one brace group that ends in `exit`: bash parses it whole before
# running any of it, so changing this file (a `git pull`) while jobs run cannot break them
# (bash otherwise reads a script as it goes, and a running job would execute the new text).
{

log() { printf 'jrt-slurm: %s\n' "$*"; }
die() { # die CODE MESSAGE: stop the job without requeueing
  log "$2"
  exit "$1"
}

# Signals to this shell. SIGUSR1 comes with --signal=B:USR1@N or `scancel --signal=USR1 --full`
# (or --batch): pass it on to the trainers, srun forwards it to every task. (`--signal=USR1@N`
# without B: and `scancel --signal=USR1 JOBID` reach the trainers only: they stop and exit 10
# all the same.) SIGTERM comes with scancel, a preemption or the time limit, to this shell and
# to srun alike, and srun answers it by killing the trainers (SIGKILL): nothing to forward,
# and no requeue by this script afterwards: Slurm decides (a preemption with
# PreemptMode=REQUEUE requeues the job by itself).
shell_got_term=0
srun_pid=""
# shellcheck disable=SC2317  # (called by the traps below, which shellcheck does not follow)
on_usr1() {
  if [[ -n $srun_pid ]]; then
    log "$(date '+%F %T') SIGUSR1 to the batch shell: forwarding it to the trainers"
    kill -s USR1 "$srun_pid" 2>/dev/null
  else
    log "$(date '+%F %T') SIGUSR1 to the batch shell before the trainers started: ignored"
  fi
  return 0
}
# shellcheck disable=SC2317
on_term() {
  log "$(date '+%F %T') SIGTERM to the batch shell (scancel, preemption or the time limit)"
  shell_got_term=1
}
trap on_usr1 USR1
trap on_term TERM

# ---- arguments and settings ------------------------------------------------------------------
config="${JRT_CONFIG:-}"
sets=()
read -r -a env_sets <<<"${JRT_SET:-}"
sets+=("${env_sets[@]}")
while (($#)); do
  case "$1" in
    --config) [[ $# -ge 2 ]] || die 2 "--config needs a value"; config="$2"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --set) [[ $# -ge 2 ]] || die 2 "--set needs SECTION.KEY=VALUE"; sets+=("$2"); shift 2 ;;
    --set=*) sets+=("${1#--set=}"); shift ;;
    -*) die 2 "unknown argument $1 (usage: CONFIG [--set SECTION.KEY=VALUE ...])" ;;
    *) [[ -z $config || $config == "${JRT_CONFIG:-}" ]] || die 2 "two configs: $config and $1"
       config="$1"; shift ;;
  esac
done

[[ -n ${SLURM_JOB_ID:-} ]] || die 2 "not inside a Slurm job: submit with sbatch (docs/SLURM.md)"
[[ -n $config ]] || die 2 "no config: sbatch slurm/train.sbatch CONFIG [--set KEY=VALUE ...]"
read -r -a python_cmd <<<"${JRT_PYTHON:-python3}"
if [[ -n ${JRT_TRAIN:-} ]]; then
  read -r -a train_cmd <<<"$JRT_TRAIN"
else
  train_cmd=("${python_cmd[@]}" -m megatron_jrt.train)
fi
read -r -a srun_extra <<<"${JRT_SRUN_ARGS:-}"
max_retries="${JRT_MAX_RETRIES:-3}"
stop_wait="${JRT_STOP_WAIT:-120}"
restart="${SLURM_RESTART_COUNT:-0}"
nodes="${SLURM_JOB_NUM_NODES:?}"
# Tasks per node = GPUs per node. SLURM_NTASKS is not used: it keeps the submission's value when
# the job is updated to fewer nodes while it waits (scontrol update ... NumNodes=).
tpn="${SLURM_NTASKS_PER_NODE:-}"
[[ $tpn =~ ^[0-9]+$ ]] || die 2 "submit with --ntasks-per-node=<GPUs per node> (got '${tpn}')"
tasks=$((nodes * tpn))
[[ $max_retries =~ ^[0-9]+$ ]] || die 2 "JRT_MAX_RETRIES must be a number, got $max_retries"

# ---- 1. the config, as jrt-train will see it ------------------------------------------------
# jrt-train validates again at start-up; doing it here too catches a bad value in seconds, in
# this shell, and gives the run and save directories this script needs.
resolved=$("${python_cmd[@]}" - "$config" "$tasks" "${sets[@]}" <<'PY'
import sys
from megatron_jrt.config import ConfigError
from megatron_jrt.train_config import load_config

config, world, sets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
try:
    cfg = load_config(config, sets)
    cfg.validate(world_size=world)
except (ConfigError, FileNotFoundError) as error:
    print(f"jrt-slurm: config error: {error}", file=sys.stderr)
    sys.exit(2)
tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
for value in (cfg.logging.run_dir, cfg.checkpoint.save_dir, cfg.checkpoint.resume,
              f"TP={tp} PP={pp} DP={world // (tp * pp)}", cfg.training.train_steps):
    print(value)
PY
)
rc=$?
if ((rc == 2)); then
  die 2 "the config does not work for $tasks tasks ($nodes nodes x $tpn): not started, not retried"
elif ((rc != 0)); then
  die 2 "could not check the config with '${python_cmd[*]}' (exit $rc): is megatron-jrt installed there? (JRT_PYTHON)"
fi
mapfile -t fields <<<"$resolved"
run_dir="${fields[0]}" save_dir="${fields[1]}" resume="${fields[2]}" layout="${fields[3]}"
train_steps="${fields[4]}"

# ---- 2. the log in the run dir --------------------------------------------------------------
mkdir -p "$run_dir" || die 4 "cannot create logging.run_dir $run_dir"
job_log="$run_dir/slurm-$SLURM_JOB_ID.out"
log "job $SLURM_JOB_ID: this job's log continues in $job_log"
exec >>"$job_log" 2>&1

first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The address Slurm reaches the first node at (NodeAddr); usually its host name.
master_addr=$(scontrol show node "$first_host" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
master_addr="${master_addr:-$first_host}"
log "==== $(date '+%F %T') job $SLURM_JOB_ID attempt $((restart + 1)) (SLURM_RESTART_COUNT=$restart)" \
    "on $nodes nodes x $tpn tasks ($SLURM_JOB_NODELIST), $layout, train_steps $train_steps;" \
    "master $master_addr, port from the job id"

# Bookkeeping of this job in the run dir: .slurm-<jobid> holds the save_dir's `latest` when the
# job first started (see the resume rule below); its mtime marks this attempt's start, so an
# exit.json older than it belongs to an earlier attempt.
job_state="$run_dir/.slurm-$SLURM_JOB_ID"
latest_now() { if [[ -n $save_dir && -f $save_dir/latest ]]; then cat "$save_dir/latest"; fi; }
[[ -f $job_state ]] || latest_now >"$job_state"
touch "$job_state"

# A requeued attempt continues from this job's newest checkpoint. An explicit
# checkpoint.resume=<path> (or none) is kept only until the job has saved a checkpoint of its
# own; after that, resuming from <path> again would throw that work away.
if ((restart > 0)) && [[ $resume != auto ]] && [[ "$(latest_now)" != "$(cat "$job_state")" ]]; then
  log "requeued after a save of this job: checkpoint.resume=auto instead of $resume"
  sets+=("checkpoint.resume=auto")
fi

# ---- 3. the trainers ------------------------------------------------------------------------
export MASTER_ADDR="$master_addr"
# torchrun's variables would win over Slurm's in the trainer, and an inherited MASTER_PORT
# would make concurrent jobs on one node collide: the trainer derives the port from the job id.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_PORT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
# NVLink multicast (NVLS) stays off unless the job's environment sets it: on machines whose
# fabric does not support it, NCCL and torch's symmetric memory fail or hang with it on.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"

set_args=()
for item in "${sets[@]}"; do set_args+=(--set "$item"); done
srun_args=(--nodes="$nodes" --ntasks="$tasks" --ntasks-per-node="$tpn")
# srun no longer inherits the job's --cpus-per-task (Slurm >= 22.11): pass it on.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
# srun: not --kill-on-bad-exit. The trainers end together (a checkpointed stop is exit 10 on
# every rank, an error is agreed across ranks), and killing the others when the first exits
# non-zero would often kill rank 0 before it writes exit.json. --wait bounds the time the
# others keep running once one task has ended (a lone crashed rank leaves its peers in a
# collective).
srun_args+=(--kill-on-bad-exit=0 --wait="$stop_wait")
cmd=(srun "${srun_args[@]}" "${srun_extra[@]}" "${train_cmd[@]}" --config "$config" "${set_args[@]}")
log "running: ${cmd[*]}"

((shell_got_term)) && die 143 "SIGTERM before the trainers started: not started, not requeued"
"${cmd[@]}" &
srun_pid=$!
while :; do
  wait "$srun_pid"
  srun_rc=$?
  # a trapped signal interrupts `wait` (status > 128) while srun runs on
  if ((srun_rc > 128)) && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done

# ---- 4. what now ----------------------------------------------------------------------------
code="$srun_rc"
exit_json="$run_dir/exit.json"
if [[ -f $exit_json && $exit_json -nt $job_state ]]; then
  json_code=$(sed -n 's/.*"code": *\([0-9][0-9]*\).*/\1/p' "$exit_json")
  [[ -n $json_code ]] && code="$json_code"
  log "trainer exit code $code (srun $srun_rc); exit.json: $(cat "$exit_json")"
else
  log "trainer exit code $code (from srun: no exit.json from this attempt)"
fi

retries_file="$run_dir/slurm-retries"
no_retry_reason() {
  case "$1" in
    2) echo "CONFIG: a config value or relation is wrong; the same config fails the same way" ;;
    3) echo "DATA: the shards, manifest or tokenizer cannot serve the run; they will not fix themselves" ;;
    4) echo "CHECKPOINT: save_dir locked by another run, disk full, or a damaged checkpoint; a retry would repeat it or fight the other run" ;;
    5) echo "NONFINITE: the loss diverged; resuming replays the same steps bit for bit (lower the lr)" ;;
    11) echo "STOPPED_UNSAVED: stopped by a signal with no checkpoint.save_dir; a requeue would start over at step 0" ;;
    130) echo "ABORTED: a person pressed Ctrl-C twice" ;;
  esac
}
requeue() { # requeue REASON CODE: requeue the job, or end with CODE if it may not be requeued
  local verb=requeue
  [[ ${JRT_REQUEUE_HOLD:-0} == 1 ]] && verb=requeuehold
  if scontrol show job "$SLURM_JOB_ID" | grep -q 'Requeue=0'; then
    die "$2" "$1; requeue is off for this job (sbatch --no-requeue, or scontrol update JobId=$SLURM_JOB_ID Requeue=0): the job ends here; sbatch again to continue"
  fi
  log "$(date '+%F %T') $1: scontrol $verb $SLURM_JOB_ID (the next attempt resumes from the newest checkpoint)"
  if ! scontrol "$verb" "$SLURM_JOB_ID"; then
    die "$2" "scontrol $verb failed: the job ends here; sbatch again to continue"
  fi
  exit 0
}

if ((code == 0)); then
  rm -f "$retries_file"
  die 0 "done: trained to training.train_steps=$train_steps; the job ends (no requeue)"
elif ((code == 10)); then
  rm -f "$retries_file"
  if ((shell_got_term)); then
    die 10 "stopped after a checkpoint; the batch shell got SIGTERM, so Slurm decides: not requeued by this script"
  fi
  requeue "stopped after a checkpoint (time limit warning, preemption or a person's signal)" 10
elif reason=$(no_retry_reason "$code") && [[ -n $reason ]]; then
  die "$code" "exit $code = $reason: not retried; fix it, then sbatch again (checkpoint.resume=auto continues)"
fi

if ((shell_got_term)); then
  die "$code" "exit $code after the batch shell got SIGTERM (scancel, preemption or the time limit): not requeued by this script"
fi
case "$code" in
  138) log "138 = killed by SIGUSR1 before jrt-train could handle it: a --signal=USR1@N larger than the time limit (or a signal during start-up)?" ;;
  143) log "143 = killed by SIGTERM before jrt-train could handle it (during start-up?)" ;;
esac

# A crash: 1 (an error; traceback in <run_dir>/logs/), or killed (128 + signal), or srun failed.
# Counted per job, reset when the save_dir got a new checkpoint since the last crash, so a long
# run with a rare crash is retried each time while a reproducible one stops after a few.
latest=$(latest_now)
count=1
if [[ -f $retries_file ]]; then
  read -r prev_job prev_count prev_latest <"$retries_file"
  if [[ ${prev_job:-} == "$SLURM_JOB_ID" && ${prev_count:-} =~ ^[0-9]+$ &&
        "${prev_latest:-}" == "${latest:-<none>}" ]]; then
    count=$((prev_count + 1))
  fi
fi
printf '%s %s %s\n' "$SLURM_JOB_ID" "$count" "${latest:-<none>}" >"$retries_file"
if ((count > max_retries)); then
  die "$code" "crashed (exit $code) $count times in a row without a new checkpoint; JRT_MAX_RETRIES=$max_retries: not retried again (see $run_dir/logs/ for the traceback)"
fi
requeue "crash $count (exit $code); retry $count of at most $max_retries" "$code"
# shellcheck disable=SC2317  # not reached (every path above ends in exit); keep it so
exit 1
}
