# Sourced by setup_env.sh (needs $VPY, the venv's python, and $PIP_LOG). $PIP_HEARTBEAT_S sets
# the heartbeat interval (60 s).
#
# pip_install WHAT ARGS...: pip install, showing a line per download and per install step and a
# heartbeat every minute instead of minutes of silence; pip's full output goes to $PIP_LOG, whose
# end is printed if pip fails.
pip_install() {
  local what=$1 start=$SECONDS status beat every=${PIP_HEARTBEAT_S:-60}
  shift
  echo "[setup] $what ..."
  (
    trap 'kill $s 2>/dev/null; exit 0' TERM
    n=0
    while :; do
      sleep "$every" & s=$!
      wait $s
      n=$((n + every))
      echo "[setup]   ... pip still working ($n s)"
    done
  ) &
  beat=$!
  set +e
  "$VPY" -m pip install --progress-bar off "$@" 2>&1 | tee -a "$PIP_LOG" \
    | grep --line-buffered -E '^ *(Downloading|Installing collected|Successfully installed|ERROR)' \
    | sed -u -E 's/^ *(.{0,140}).*/[setup]   \1/'
  status=${PIPESTATUS[0]}
  set -e
  kill "$beat" 2>/dev/null || true
  wait "$beat" 2>/dev/null || true
  if [ "$status" -ne 0 ]; then
    echo "[setup] pip failed while $what; the end of $PIP_LOG:" >&2
    tail -n 30 "$PIP_LOG" >&2
    exit "$status"
  fi
  echo "[setup] $what: done in $((SECONDS - start)) s"
}
