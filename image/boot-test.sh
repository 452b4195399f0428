#!/usr/bin/env bash
# Boots an appliance image in qemu (TCG, OVMF) and checks it from the host.
#
#   image/boot-test.sh [--variant dev|prod] [--image FILE] [--timeout SECONDS] [--keep]
#
# dev (default): /readyz answers 200, a signature made through the API with
#   the dev client certificate verifies with OpenSSL (and a changed message
#   does not), systemd in the guest reports svsd active and the system
#   running.
# prod: the first-boot path: the unprovisioned appliance boots without
#   questions when given systemd credentials (as a VM deployment would),
#   makes its own identity, loads the firewall, and svsd reports not-ready
#   with a reason; then the officer's procedure of docs/operations.md §3.5-3.9
#   is run over SSH (token, PINs, keys, TLS, entity) and the same signing
#   checks as for dev follow, with the key "sign"; then the entity is
#   suspended and resumed with svs-provision (a reload through systemd,
#   confirmed by its audit record), and an edit of another configuration
#   than the unit's is refused; last, the package is installed again (the
#   upgrade path) and svsd must come back ready.
#
# The image is not modified (the guest writes to a qcow2 overlay). Host
# listeners: the forwarded ports, bound to 127.0.0.1 only. qemu is stopped
# by its PID on every exit path. The serial console is kept in
# target/image/boot-test-<variant>/serial.log.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT_DIR/target/image"
VARIANT=dev
IMAGE=
TIMEOUT=300
KEEP=0
while (($#)); do
    case "$1" in
    --variant) VARIANT=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "boot-test.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$VARIANT" in dev | prod) ;; *) echo "boot-test.sh: --variant dev|prod" >&2; exit 2 ;; esac
IMAGE=${IMAGE:-$OUT/svs-$VARIANT.raw}
DEV="$OUT/dev"

OVMF_CODE=/usr/share/OVMF/OVMF_CODE_4M.fd
OVMF_VARS=/usr/share/OVMF/OVMF_VARS_4M.fd
need=("$IMAGE" "$OVMF_CODE" "$OVMF_VARS")
[ "$VARIANT" = dev ] && need+=("$DEV/ca.pem" "$DEV/client.pem" "$DEV/client-key.pem" "$DEV/ssh_key")
for f in "${need[@]}"; do
    [ -f "$f" ] || { echo "boot-test.sh: $f is missing (image/build.sh --variant $VARIANT makes it)" >&2; exit 1; }
done
for t in qemu-system-x86_64 qemu-img curl openssl ssh ssh-keygen python3; do
    command -v "$t" >/dev/null || { echo "boot-test.sh: $t is missing (.ci/image --install-only)" >&2; exit 1; }
done

RUN="$OUT/boot-test-$VARIANT"
rm -rf "$RUN"
mkdir -p "$RUN"
SERIAL="$RUN/serial.log"

log() { printf '[boot-test %s %s] %s\n' "$VARIANT" "$(date +%T)" "$*"; }
GUEST_UP=0
fail() {
    echo "FAIL: $*"
    if ((GUEST_UP)); then
        echo "---- svsd's journal in the guest (last 25 lines) ----"
        guest journalctl -b -u svsd.service -n 25 --no-pager -o cat 2>&1 | sed 's/\x1b\[[0-9;]*m//g' || true
    fi
    exit 1
}

# Free ports from the kernel; qemu binds them a moment later.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port)
SSH_PORT=$(free_port)
while [ "$SSH_PORT" = "$API_PORT" ]; do SSH_PORT=$(free_port); done

qemu-img create -q -f qcow2 -F raw -b "$(realpath "$IMAGE")" "$RUN/disk.qcow2"
cp "$OVMF_VARS" "$RUN/vars.fd"

QEMU_PID=
stop_qemu() {
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$QEMU_PID" 2>/dev/null || true
    fi
    [ -n "$QEMU_PID" ] && wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
}
finish() {
    local rc=$?
    stop_qemu
    if ((rc != 0)); then
        echo "---- last 40 lines of the serial console ($SERIAL) ----"
        tail -n 40 "$SERIAL" 2>/dev/null | sed 's/\x1b\[[0-9;?=]*[A-Za-z]//g' || true
        echo "---- end ----"
    fi
    ((KEEP)) || rm -f "$RUN/disk.qcow2" "$RUN/vars.fd"
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

SMBIOS=()
if [ "$VARIANT" = prod ]; then
    # The production image has no account anyone can log in to. systemd
    # (252) takes credentials from SMBIOS OEM strings in a VM: an SSH key
    # for root (tmpfiles' provision.conf installs it) and a root password
    # hash, which systemd-firstboot sets instead of asking on the console.
    ssh-keygen -q -t ed25519 -N '' -C svs-boot-test -f "$RUN/ssh_key"
    SSH_KEY="$RUN/ssh_key"
    ROOT_HASH=$(openssl passwd -6 "boot-test-$RANDOM$RANDOM")
    SMBIOS=(-smbios "type=11,value=io.systemd.credential.binary:ssh.authorized_keys.root=$(base64 -w0 "$RUN/ssh_key.pub")"
        -smbios "type=11,value=io.systemd.credential.binary:passwd.hashed-password.root=$(printf %s "$ROOT_HASH" | base64 -w0)")
else
    SSH_KEY="$DEV/ssh_key"
fi

log "boot $(basename "$IMAGE"): API on 127.0.0.1:$API_PORT, SSH on 127.0.0.1:$SSH_PORT"
start=$(date +%s.%N)
qemu-system-x86_64 \
    -accel tcg -cpu max -machine q35 -smp 2 -m 1024 \
    -drive if=pflash,format=raw,unit=0,readonly=on,file="$OVMF_CODE" \
    -drive if=pflash,format=raw,unit=1,file="$RUN/vars.fd" \
    -drive if=virtio,format=qcow2,file="$RUN/disk.qcow2" \
    -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$API_PORT-:8443,hostfwd=tcp:127.0.0.1:$SSH_PORT-:22" \
    -device virtio-net-pci,netdev=net0 \
    -device virtio-rng-pci \
    "${SMBIOS[@]}" \
    -display none -monitor none -serial "file:$SERIAL" -no-reboot \
    </dev/null >"$RUN/qemu.log" 2>&1 &
QEMU_PID=$!

elapsed() { awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
deadline=$(($(date +%s) + TIMEOUT))
# Polls "$@" once a second until it succeeds, qemu dies or time runs out.
wait_for() {
    local what=$1
    shift
    while ! "$@"; do
        kill -0 "$QEMU_PID" 2>/dev/null || { cat "$RUN/qemu.log"; fail "qemu exited while waiting for $what"; }
        (($(date +%s) < deadline)) || fail "no $what within ${TIMEOUT}s of boot"
        sleep 1
    done
}

SSH=(ssh -q -i "$SSH_KEY" -p "$SSH_PORT" -o BatchMode=yes -o ConnectTimeout=10
    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@127.0.0.1)
guest() { "${SSH[@]}" "$@"; }
ssh_up() { guest true 2>/dev/null && GUEST_UP=1; }

if [ "$VARIANT" = prod ]; then
    log "waiting for SSH (timeout ${TIMEOUT}s)"
    wait_for "SSH login with the key from the SMBIOS credential" ssh_up
    log "ok   SSH up after $(elapsed)s; root's key came from the SMBIOS credential"
    # svsd is ordered after time-sync.target, which chrony-wait holds until
    # the clock is synchronised or 180 s have passed; qemu offers no time
    # server, so cut that wait short as its timeout would.
    guest systemctl stop chrony-wait.service 2>/dev/null || true
    # Give svsd time to start, or to fail and be restarted, before judging.
    settled() {
        [ -z "$(guest systemctl list-jobs --no-legend svsd.service)" ] &&
            [ "$(guest systemctl show -p ActiveState --value svsd.service)" != activating ]
    }
    wait_for "svsd to leave 'activating'" settled
    sleep 5
    guest systemctl status --no-pager --lines=0 svsd.service >"$RUN/svsd-status.txt" 2>&1 || true
    guest journalctl -b -u svsd.service --no-pager -o cat >"$RUN/svsd-journal.txt" 2>&1 || true
    active=$(guest systemctl is-active svsd.service) || true
    status_text=$(guest systemctl show -p StatusText --value svsd.service) || true
    # One string: ssh hands the remote shell a command line, not an argv.
    readyz=$(guest "curl -s -w ' %{http_code}' --max-time 5 http://127.0.0.1:8080/readyz" 2>/dev/null) || true
    echo "     svsd: $active; status: ${status_text:-<none>}; local /readyz: ${readyz:-<no answer>}"
    echo "     svsd's journal (first lines):"
    sed 's/\x1b\[[0-9;]*m//g' "$RUN/svsd-journal.txt" | head -n 3 | sed 's/^/       /'
    if [ "$active" = active ] && [ "${readyz##* }" = 503 ] && [[ "$status_text" == "not ready"* ]]; then
        log "ok   unprovisioned svsd runs and reports not-ready: ${readyz% *}"
        FIRST_BOOT_OK=1
        # Waiting must outlast the watchdog (WatchdogSec=30s): it has to
        # keep pinging while it is not ready.
        up_s=$(guest 'echo $(( $(cut -d. -f1 /proc/uptime) - $(systemctl show -p ActiveEnterTimestampMonotonic --value svsd.service) / 1000000 ))')
        ((up_s >= 40)) || sleep $((40 - up_s))
        if [ "$(guest systemctl is-active svsd.service)" = active ] &&
            [ "$(guest systemctl show -p NRestarts --value svsd.service)" = 0 ]; then
            log "ok   still waiting, not restarted, 40 s after its start (watchdog pings while not ready)"
        else
            FIRST_BOOT_OK=0
            log "FAIL unprovisioned svsd did not keep running 40 s: $(guest systemctl show -p Result,NRestarts svsd.service | tr '\n' ' ')"
        fi
    else
        # Reported at the end: the provisioning below is worth running anyway.
        FIRST_BOOT_OK=0
        log "FAIL unprovisioned svsd should run, say 'not ready: …' in its status and answer /readyz with 503 and the reason"
    fi
    [ "$(guest cat /etc/machine-id)" != uninitialized ] || fail "machine-id was not initialised at first boot"
    guest test -s /etc/ssh/ssh_host_ed25519_key || fail "no SSH host key made at first boot"
    [ "$(guest getent shadow root | cut -d: -f2)" = "$ROOT_HASH" ] ||
        fail "systemd-firstboot did not set root's password from the credential"
    log "ok   first boot made a machine ID and SSH host keys, and set root's password"
    guest nft list chain inet filter input >"$RUN/nft.txt" || fail "no firewall loaded"
    grep -q 'policy drop' "$RUN/nft.txt" || fail "firewall input policy is not drop"
    log "ok   nftables loaded, input policy drop"

    # docs/operations.md §3.5-3.10, as an officer would type them, with the
    # PINs on standard input instead of a prompt and a throw-away CA on the
    # host in the role of the site's CA.
    log "provisioning as in docs/operations.md §3.5-3.9"
    SO_PIN=so-$RANDOM$RANDOM
    USER_PIN=user-$RANDOM$RANDOM
    P="svs-provision -c /etc/svs/svsd.toml"
    step() { # description, guest command; stdin goes to the guest
        guest "$2" >"$RUN/step.log" 2>&1 || { cat "$RUN/step.log"; fail "$1"; }
    }
    printf '%s\n' "$SO_PIN" | step "token init" "$P token init --label svs"
    printf '%s\n' "$USER_PIN" | step "user PIN credential" "umask 077; cat > /etc/credstore/svs-hsm-pin"
    printf '%s\n%s\n' "$SO_PIN" "$USER_PIN" | step "pin init" "$P pin init"
    printf '%s\n' "$USER_PIN" | step "key generate svs-sign" "$P key generate --label svs-sign"
    printf '%s\n' "$USER_PIN" | step "key generate svs-audit" "$P key generate --label svs-audit"
    step "server key and CSR" 'cd /etc/svs/tls &&
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout server-key.pem -out server.csr -subj "/CN=localhost/O=SVS boot test" \
            -addext "subjectAltName=DNS:localhost,IP:127.0.0.1"'
    guest cat /etc/svs/tls/server.csr >"$RUN/server.csr"
    (
        cd "$RUN"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -keyout ca-key.pem -out ca.pem -subj "/CN=SVS boot test CA" \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
            -extfile server.ext -out server.pem
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout client-key.pem -out client.csr -subj "/CN=boot-test-app/O=SVS boot test"
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
            -extfile client.ext -out client.pem
    ) >"$RUN/pki.log" 2>&1 || { cat "$RUN/pki.log"; fail "test PKI"; }
    step "install server certificate" "cat > /etc/svs/tls/server.pem" <"$RUN/server.pem"
    step "install client CA" "cat > /etc/svs/tls/client-ca.pem" <"$RUN/ca.pem"
    step "TLS file modes" "cd /etc/svs/tls && chown root:svs server-key.pem server.pem client-ca.pem &&
        chmod 0640 server-key.pem server.pem client-ca.pem && rm server.csr"
    step "client certificate copy" "cat > /root/app-client.pem" <"$RUN/client.pem"
    step "entity add" "$P entity add --no-reload --name boot-test-app \
        --cert /root/app-client.pem --keys sign --ops sign,verify --rate 200/s"
    step "svsd --check-config" "svsd --check-config"
    step "start svsd" "systemctl reset-failed svsd; systemctl restart svsd"
    PROVISIONED_S=$(elapsed)
    log "ok   provisioned; svsd restarted"

    CURL=(curl -sS --max-time 5 --cacert "$RUN/ca.pem" --cert "$RUN/client.pem" --key "$RUN/client-key.pem")
    BASE="https://127.0.0.1:$API_PORT"
    KEY=sign
else
    KEY=demo
    CURL=(curl -sS --max-time 5 --cacert "$DEV/ca.pem" --cert "$DEV/client.pem" --key "$DEV/client-key.pem")
    BASE="https://127.0.0.1:$API_PORT"
fi

# slirp accepts a forwarded connection before anything listens in the guest
# (and then drops it), so only a real HTTP status counts.
readyz_200() {
    [ "$("${CURL[@]}" -o "$RUN/readyz.json" -w '%{http_code}' "$BASE/readyz" 2>/dev/null)" = 200 ]
}
log "waiting for /readyz (timeout ${TIMEOUT}s)"
wait_for "200 from /readyz" readyz_200
ready_s=$(elapsed)
log "ok   /readyz 200 after ${ready_s}s: $(cat "$RUN/readyz.json")"

printf 'SVS boot test %s\n' "$(date -u +%FT%TZ)" >"$RUN/msg.bin"
data=$(base64 -w0 "$RUN/msg.bin")
"${CURL[@]}" --max-time 30 -f -H 'content-type: application/json' \
    -d "{\"key\":\"$KEY\",\"data\":\"$data\",\"encoding\":\"der\"}" "$BASE/v1/sign" >"$RUN/sign.json" ||
    fail "POST /v1/sign: $(cat "$RUN/sign.json")"
"${CURL[@]}" -f "$BASE/v1/keys/$KEY" >"$RUN/key.json" || fail "GET /v1/keys/$KEY: $(cat "$RUN/key.json")"
python3 - "$RUN" <<'PY'
import base64, json, sys
run = sys.argv[1]
sign = json.load(open(f"{run}/sign.json"))
assert sign.get("encoding") == "der", sign
open(f"{run}/sig.der", "wb").write(base64.b64decode(sign["signature"]))
open(f"{run}/pub.pem", "w").write(json.load(open(f"{run}/key.json"))["public_key"])
PY
# The API's default distinguishing ID, GM/T 0009's 1234567812345678.
verify() {
    openssl pkeyutl -verify -pubin -inkey "$RUN/pub.pem" -rawin -in "$1" \
        -sigfile "$RUN/sig.der" -digest sm3 -pkeyopt distid:1234567812345678
}
out=$(verify "$RUN/msg.bin" 2>&1) || fail "OpenSSL does not verify the signature from /v1/sign: $out"
log "ok   signature from /v1/sign (key $KEY) verifies with OpenSSL ($out)"
printf 'tampered\n' >>"$RUN/msg.bin"
! verify "$RUN/msg.bin" >/dev/null 2>&1 || fail "OpenSSL verifies the signature over a changed message"
log "ok   the same signature over a changed message does not verify"

# sshd may still be making its host keys when svsd is already up.
wait_for "SSH login" ssh_up
active=$(guest systemctl is-active svsd.service) || true
if [ "$active" != active ]; then
    guest systemctl status --no-pager svsd.service || true
    fail "systemctl is-active svsd in the guest says: ${active:-<no answer>}"
fi
log "ok   systemctl is-active svsd: active"
if [ "$VARIANT" = dev ]; then
    restarts=$(guest systemctl show -p NRestarts --value svsd.service)
    [ "$restarts" = 0 ] || fail "svsd restarted $restarts times"
else
    # An entity edit on the running appliance: svs-provision reloads svsd
    # through systemd and waits for the reload record that read its edit.
    sign_status() {
        "${CURL[@]}" -o /dev/null -w '%{http_code}' -H 'content-type: application/json' \
            -d "{\"key\":\"$KEY\",\"data\":\"$data\"}" "$BASE/v1/sign"
    }
    step "entity suspend (systemctl reload, confirmed)" "$P entity suspend --name boot-test-app"
    [ "$(sign_status)" = 403 ] || fail "a suspended entity still signs"
    step "entity resume (systemctl reload, confirmed)" "$P entity resume --name boot-test-app"
    [ "$(sign_status)" = 200 ] || fail "a resumed entity does not sign"
    # Another configuration than the unit's: refused before any edit.
    step "a second configuration" "cp /etc/svs/svsd.toml /root/other.toml"
    rc=0
    guest "svs-provision -c /root/other.toml entity suspend --name boot-test-app" >"$RUN/step.log" 2>&1 || rc=$?
    [ "$rc" = 2 ] && grep -q "runs with the configuration" "$RUN/step.log" ||
        { cat "$RUN/step.log"; fail "an edit of another configuration than svsd's was not refused (exit $rc)"; }
    log "ok   entity suspend and resume reload svsd through systemd; another configuration's edit refused"
    # The upgrade path of docs/operations.md §7 with the package this image
    # was built from: postinst checks the configuration with the new svsd
    # and restarts the running one; the appliance must come back ready.
    deb=$(ls -t "$OUT"/svs_*_amd64.deb 2>/dev/null | head -n 1)
    if [ -n "$deb" ]; then
        step "copy $(basename "$deb")" "cat > /root/svs-upgrade.deb" <"$deb"
        pid_before=$(guest systemctl show -p MainPID --value svsd.service)
        step "install the package again (upgrade path)" "apt-get install -y --reinstall /root/svs-upgrade.deb"
        pid_after=$(guest systemctl show -p MainPID --value svsd.service)
        [ "$pid_after" != "$pid_before" ] || fail "the upgrade did not restart svsd (pid $pid_before)"
        deadline=$(($(date +%s) + 60))
        wait_for "200 from /readyz after the upgrade" readyz_200
        log "ok   package upgrade restarted svsd (pid $pid_before -> $pid_after), /readyz 200 again"
    fi
fi

for unit in nftables chrony ssh; do
    [ "$(guest systemctl is-active "$unit.service")" = active ] || fail "$unit.service is not active"
done
log "ok   nftables, chrony and ssh active"
if [ "$VARIANT" = dev ]; then
    state=$(guest systemctl is-system-running) || true
    if [ "$state" != running ]; then
        guest systemctl --failed --no-pager || true
        fail "the guest's system state is ${state:-<no answer>}"
    fi
    log "ok   systemctl is-system-running: running"
fi
guest systemd-analyze time 2>/dev/null | sed 's/^/     guest: /' || true
if [ "$VARIANT" = prod ] && ((FIRST_BOOT_OK == 0)); then
    fail "provisioning and signing work, but unprovisioned svsd did not run and report not-ready (see above)"
fi
log "PASS (ready after ${ready_s}s${PROVISIONED_S:+; provisioned after ${PROVISIONED_S}s})"
