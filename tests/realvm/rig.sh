# The real-VM guest's workload and verifier (busybox sh; tests/realvm/workload.py ships it).
#
# /init runs it with the control channel (ttyS1, raw) on stdin and stdout; log lines go to
# stderr (the console). It fills $RIG_DATA with the files of $RIG_PLAN, records their sha256,
# replies "ready" and then only answers commands, leaving the data cold in between.
# A command is one line "<id> <verb> [<arg>]"; every reply is one line
#     @@RIG-<token> <id> <verb> key=value ...@@
# with the id of the command it answers (0 for ready/fail), so stale replies and noise
# cannot be mistaken for an answer.
# Environment: RIG_TOKEN, RIG_DATA (the tmpfs to fill), RIG_STATE (scratch: metadata, sums),
# RIG_SEED (text seed, a multiple of 4096 bytes long), RIG_PLAN ("name kind size offset" lines),
# RIG_TEXT_STRIDE (bytes a churned text file moves on in the seed; see workload.py).
# It never powers off itself: "poweroff" replies "bye" and exits, /init does the rest.

D=$RIG_DATA
S=$RIG_STATE
CANARY=canary

reply() { echo "@@RIG-$RIG_TOKEN $*@@"; }
log() { echo "realvm: $*" >&2; }
now() { read -r up rest < /proc/uptime; echo "$up"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# text NAME SIZE OFF: SIZE bytes of the seed from byte OFF on, wrapping at the seed's end.
text() {
  first=$((L - $3))
  [ "$first" -gt "$2" ] && first=$2
  dd if="$RIG_SEED" of="$D/$1" bs=65536 iflag=skip_bytes,count_bytes skip="$3" \
    count="$first" 2>/dev/null || return 1
  [ "$2" -eq "$first" ] && return 0
  dd if="$RIG_SEED" of="$D/$1" bs=65536 iflag=count_bytes count=$(($2 - first)) \
    oflag=append conv=notrunc 2>/dev/null
}

# make NAME KIND SIZE OFF: (re)write one data file. t = text from the seed, r = random,
# z = zeros (written, so the pages exist).
make() {
  case $2 in
    t) text "$1" "$3" "$4" ;;
    r) dd if=/dev/urandom of="$D/$1" bs=65536 iflag=count_bytes,fullblock count="$3" \
         2>/dev/null ;;
    z) dd if=/dev/zero of="$D/$1" bs=65536 iflag=count_bytes count="$3" 2>/dev/null ;;
    *) return 1 ;;
  esac
}

# The canary: one page whose first bytes (a marker built from the token) exist only in
# this file's page. Its two halves are written separately and joined by cat, so no buffer
# of any process ever holds them side by side. It is never churned or touched.
canary() {
  printf 'RIGCANARY-%s' "$RIG_TOKEN" > "$S/ca" || return 1
  printf '=%s-YRANACGIR\n' "$RIG_TOKEN" > "$S/cb" || return 1
  cat "$S/ca" "$S/cb" > "$D/$CANARY" || return 1
  dd if="$RIG_SEED" bs=3000 count=1 2>/dev/null >> "$D/$CANARY" || return 1
  rm -f "$S/ca" "$S/cb"
}

fill() {
  t0=$(now)
  L=$(wc -c < "$RIG_SEED")
  mkdir -p "$S/meta" "$S/sum" || { why=mkdir; return 1; }
  : > "$S/names"
  canary || { why=canary; return 1; }
  n=0
  bytes=0
  while read -r name kind size off; do
    make "$name" "$kind" "$size" "$off" || { why=write-$name; return 1; }
    echo "$kind $size $off 0" > "$S/meta/$name"
    echo "$name" >> "$S/names"
    n=$((n + 1))
    bytes=$((bytes + size))
    [ $((n % 50)) -eq 0 ] && log "filled $n files, $((bytes >> 20)) MiB"
  done < "$RIG_PLAN"
  NFILES=$n
  log "filled $n files, $((bytes >> 20)) MiB in $(since "$t0") s; hashing"
  # The canary first: the buffer sha256sum reads it into is overwritten by the next file.
  (cd "$D" && sha256sum "$CANARY" $(cat "$S/names")) > "$S/all" || { why=sha256sum; return 1; }
  while read -r h f; do echo "$h  $f" > "$S/sum/$f"; done < "$S/all"
  reply 0 ready files=$((n + 1)) bytes=$bytes seconds="$(since "$t0")"
}

verify() {
  t0=$(now)
  cat "$S"/sum/* > "$S/sums"
  (cd "$D" && sha256sum -c "$S/sums") > "$S/vout" 2>/dev/null
  total=$(wc -l < "$S/sums")
  ok=$(grep -c ': OK$' "$S/vout")
  bad=$(sed -n 's/: FAILED$//p' "$S/vout" | tr '\n' ',')
  reply "$1" verify ok="$ok" bad=$((total - ok)) seconds="$(since "$t0")" files="${bad%,}"
}

# pick PERCENT CURSOR: ceil(PERCENT% of the data files) names from CURSOR on, wrapping.
pick() {
  awk -v p="$1" -v c="$2" '{ l[NR - 1] = $0 }
    END { k = int((NR * p + 99) / 100); for (i = 0; i < k; i++) print l[(c + i) % NR] }' \
    "$S/names"
}

churn() {
  t0=$(now)
  k=0
  changed=0
  for f in $(pick "$2" "$CHURN_AT"); do
    read -r kind size off gen < "$S/meta/$f"
    # Text moves on in the seed to an offset within a page that no other file, and no
    # earlier generation of any file, started at (workload.py): all its pages are new.
    [ "$kind" = t ] && off=$(((off + RIG_TEXT_STRIDE) % L))
    make "$f" "$kind" "$size" "$off" || { reply "$1" error reason=write-"$f"; return; }
    echo "$kind $size $off $((gen + 1))" > "$S/meta/$f"
    read -r old < "$S/sum/$f"
    (cd "$D" && sha256sum "$f") > "$S/sum/$f" || { reply "$1" error reason=sum-"$f"; return; }
    read -r new < "$S/sum/$f"
    [ "$new" = "$old" ] || changed=$((changed + 1))
    k=$((k + 1))
  done
  CHURN_AT=$(((CHURN_AT + k) % NFILES))
  reply "$1" churn files=$k changed=$changed seconds="$(since "$t0")"
}

touch_files() {
  t0=$(now)
  k=0
  bytes=0
  for f in $(pick "$2" "$TOUCH_AT"); do
    # dd read()s every byte (cat would splice the pages without touching them).
    dd if="$D/$f" of=/dev/null bs=1048576 2>/dev/null || { reply "$1" error reason=read-"$f"; return; }
    read -r kind size rest < "$S/meta/$f"
    bytes=$((bytes + size))
    k=$((k + 1))
  done
  TOUCH_AT=$(((TOUCH_AT + k) % NFILES))
  reply "$1" touch files=$k bytes=$bytes seconds="$(since "$t0")"
}

stats() {
  mem=$(awk '/^MemTotal:/ { t = $2 } /^MemFree:/ { f = $2 } /^MemAvailable:/ { a = $2 }
    /^Shmem:/ { s = $2 }
    END { printf "mem_total_kib=%d mem_free_kib=%d mem_available_kib=%d shmem_kib=%d", t, f, a, s }' \
    /proc/meminfo)
  data=$(du -sk "$D" | cut -f1)
  reply "$1" stats $mem data_kib="$data" files=$((NFILES + 1))
}

percent_ok() {
  case $1 in ''|*[!0-9]*) return 1 ;; esac
  [ "$1" -le 100 ]
}

if ! fill; then
  log "fill failed: $why"
  reply 0 fail reason="$why"
  exit 1
fi
log "ready: $((NFILES + 1)) files; waiting for commands"
CHURN_AT=0
TOUCH_AT=0
while :; do
  if ! read -r id cmd arg; then
    log "control channel closed"
    exit 2
  fi
  case $cmd in
    verify) verify "$id" ;;
    churn|touch)
      if ! percent_ok "$arg"; then reply "$id" error reason=bad-percent; continue; fi
      if [ "$cmd" = churn ]; then churn "$id" "$arg"; else touch_files "$id" "$arg"; fi ;;
    stats) stats "$id" ;;
    poweroff) reply "$id" bye; exit 0 ;;
    *) reply "$id" error reason=unknown-command ;;
  esac
done
