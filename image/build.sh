#!/usr/bin/env bash
# Builds the SVS appliance disk image from Debian 12 packages and the release
# binaries of this tree. See image/README.md.
#
#   image/build.sh [--variant prod|dev] [--profile release|debug] [--out DIR]
#                  [--console vga|serial] [--root-size-mb N]
#   image/build.sh --cargo-only [--profile release|debug]
#   image/build.sh --rootfs-only
#
# Output in OUT (default target/image/): svs-<variant>.raw (GPT disk image),
# svs_<version>_amd64.deb (the package the image installs, and the upgrade
# artifact), and for --variant dev: dev/ with the client PKI and SSH key the
# boot test uses.
#
# Needs root (debootstrap, chroot, files owned by other users), and the host
# tools listed in REQUIRED_TOOLS (.ci/image installs them). No loop devices,
# no mounts of the image: the ESP is written with mtools and the root file
# system with mkfs.ext4 -d, so this also runs where the kernel cannot mount
# vfat.
set -euo pipefail

ROOT_DIR=$(cd "$(dirname "$0")/.." && pwd)
IMAGE_DIR="$ROOT_DIR/image"
VARIANT=prod
OUT="$ROOT_DIR/target/image"
ROOTFS_ONLY=0
CARGO_ONLY=0
PROFILE=release
ROOT_MB=4096
ESP_MB=256
CONSOLE=vga
SUITE=bookworm
MIRROR=${SVS_DEBIAN_MIRROR:-http://deb.debian.org/debian}

while (($#)); do
    case "$1" in
    --variant) VARIANT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --rootfs-only) ROOTFS_ONLY=1; shift ;;
    --cargo-only) CARGO_ONLY=1; shift ;;
    --profile) PROFILE=$2; shift 2 ;;
    --root-size-mb) ROOT_MB=$2; shift 2 ;;
    --console) CONSOLE=$2; shift 2 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$VARIANT" in prod | dev) ;; *) echo "build.sh: --variant prod|dev" >&2; exit 2 ;; esac
case "$PROFILE" in release | debug) ;; *) echo "build.sh: --profile release|debug" >&2; exit 2 ;; esac
case "$CONSOLE" in vga | serial) ;; *) echo "build.sh: --console vga|serial" >&2; exit 2 ;; esac
BIN_DIR="$ROOT_DIR/target/$PROFILE"

log() { printf '[image %s] %s\n' "$(date +%T)" "$*"; }

# svsd (with the soft token linked in), the soft token as a loadable module
# for PKCS#11 tools, and svs-provision once it is part of the workspace.
cargo_packages() {
    local pkgs=(-p svs-appliance -p svs-softtoken)
    # Until its binary exists the package cannot be built for it.
    if [ -f "$ROOT_DIR/provisioning/src/bin/svs-provision.rs" ]; then
        pkgs+=(-p svs-provision)
    fi
    printf '%s\n' "${pkgs[@]}"
}
if ((CARGO_ONLY)); then
    mapfile -t pkgs < <(cargo_packages)
    flags=()
    [ "$PROFILE" = release ] && flags+=(--release)
    log "cargo build ${flags[*]} ${pkgs[*]}"
    (cd "$ROOT_DIR" && cargo build "${flags[@]}" "${pkgs[@]}")
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "build.sh: must run as root" >&2; exit 1; }

REQUIRED_TOOLS=(debootstrap mkfs.ext4 mkfs.vfat mcopy mmd sfdisk dpkg-deb zstd unshare ssh-keygen)
for t in "${REQUIRED_TOOLS[@]}"; do
    command -v "$t" >/dev/null || { echo "build.sh: $t is missing (run .ci/image --install-only)" >&2; exit 1; }
done

# Packages of the appliance, all from Debian 12 main. linux-image-amd64 and
# the generic initramfs (MODULES=most) so the image boots on real hardware as
# well as in qemu; chrony for a disciplined clock (GB/T 38629 §5.7: audit and
# signing time must come from a trusted source); nftables for the firewall;
# systemd-boot-efi so the boot loader matches the image's systemd.
PACKAGES=(
    systemd systemd-sysv systemd-resolved udev dbus kmod
    linux-image-amd64 initramfs-tools zstd
    chrony nftables openssh-server
    iproute2 iputils-ping procps less ca-certificates openssl curl netbase
    systemd-boot-efi
)
# Bump when the way the cached root file system is made changes.
ROOTFS_RECIPE=1
CACHE="$OUT/cache"
WORK="$OUT/work-$VARIANT"
mkdir -p "$CACHE" "$WORK"

rootfs_key=$(printf '%s\n' "$ROOTFS_RECIPE" "$SUITE" "$MIRROR" "${PACKAGES[@]}" | sha256sum | cut -c1-16)
ROOTFS_TAR="$CACHE/rootfs-$SUITE-$rootfs_key.tar.zst"

build_rootfs() {
    local tmp="$CACHE/rootfs.tmp"
    rm -rf "$tmp"
    log "debootstrap $SUITE from $MIRROR (cached afterwards as $(basename "$ROOTFS_TAR"))"
    local include
    include=$(IFS=,; echo "${PACKAGES[*]}")
    # minbase: no "important" priority packages; what the appliance needs is
    # listed above, so nothing arrives unreviewed.
    debootstrap --variant=minbase --include="$include" "$SUITE" "$tmp" "$MIRROR"
    chroot "$tmp" apt-get clean
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin
    tar -C "$tmp" --zstd --numeric-owner --xattrs --xattrs-include='*' -cf "$ROOTFS_TAR.part" .
    mv "$ROOTFS_TAR.part" "$ROOTFS_TAR"
    rm -rf "$tmp"
    # Root file systems of earlier package lists are dead weight.
    find "$CACHE" -maxdepth 1 -name 'rootfs-*.tar.zst' ! -name "$(basename "$ROOTFS_TAR")" -delete
}

if [ -s "$ROOTFS_TAR" ]; then
    log "root file system from cache: $(basename "$ROOTFS_TAR")"
else
    build_rootfs
fi
((ROOTFS_ONLY)) && exit 0

# ---------------------------------------------------------------- the package

for f in svsd libsvs_softtoken.so; do
    [ -f "$BIN_DIR/$f" ] || { echo "build.sh: $BIN_DIR/$f is missing: run image/build.sh --cargo-only --profile $PROFILE" >&2; exit 1; }
done

version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' "$ROOT_DIR/Cargo.toml")
if git -C "$ROOT_DIR" rev-parse --git-dir >/dev/null 2>&1; then
    # Commit time first, so dpkg orders upgrades the way they were made.
    version="$version+git$(git -C "$ROOT_DIR" log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S).$(git -C "$ROOT_DIR" rev-parse --short=8 HEAD)"
fi
DEB="$OUT/svs_${version}_amd64.deb"

build_deb() {
    local pkg="$WORK/pkg"
    rm -rf "$pkg"
    install -D -m 0755 "$BIN_DIR/svsd" "$pkg/usr/bin/svsd"
    if [ -f "$BIN_DIR/svs-provision" ]; then
        install -D -m 0755 "$BIN_DIR/svs-provision" "$pkg/usr/bin/svs-provision"
    fi
    # Where Debian's PKCS#11 tools (p11-kit, pkcs11-tool --module) look.
    install -D -m 0644 "$BIN_DIR/libsvs_softtoken.so" "$pkg/usr/lib/x86_64-linux-gnu/pkcs11/libsvs_softtoken.so"
    install -D -m 0644 "$ROOT_DIR/systemd/svsd.service" "$pkg/usr/lib/systemd/system/svsd.service"
    install -D -m 0644 "$ROOT_DIR/systemd/sysusers.d/svs.conf" "$pkg/usr/lib/sysusers.d/svs.conf"
    install -D -m 0644 "$ROOT_DIR/systemd/tmpfiles.d/svs.conf" "$pkg/usr/lib/tmpfiles.d/svs.conf"
    for f in svsd.toml softtoken.toml entities.toml; do
        install -D -m 0644 "$IMAGE_DIR/deb/$f" "$pkg/usr/share/svs/$f"
    done
    local doc="$pkg/usr/share/doc/svs"
    install -D -m 0644 "$ROOT_DIR/docs/operations.md" "$doc/operations.md"
    for f in "$ROOT_DIR"/docs/*.md "$ROOT_DIR/README.md"; do
        [ -f "$f" ] && install -m 0644 "$f" "$doc/"
    done
    install -d "$doc/examples"
    install -m 0644 "$ROOT_DIR"/systemd/examples/*.conf "$doc/examples/"
    install -d "$pkg/DEBIAN"
    install -m 0755 "$IMAGE_DIR/deb/postinst" "$IMAGE_DIR/deb/prerm" "$IMAGE_DIR/deb/postrm" "$pkg/DEBIAN/"
    cat >"$pkg/DEBIAN/control" <<CONTROL
Package: svs
Version: $version
Architecture: amd64
Maintainer: SVS <svs@example.invalid>
Section: admin
Priority: optional
Depends: libc6 (>= 2.36), systemd (>= 252)
Recommends: chrony, nftables
Installed-Size: $(du -sk "$pkg" | cut -f1)
Description: SVS SM2 signing and verification server
 svsd, the HTTPS/mTLS signing daemon with the embedded SM2 soft token,
 its hardened systemd unit, and the officers' tools.
CONTROL
    dpkg-deb --root-owner-group -Zgzip --build "$pkg" "$DEB" >/dev/null
    rm -rf "$pkg"
}
log "package $(basename "$DEB") ($PROFILE binaries)"
# One package in OUT: the one this image holds (the boot test upgrades with it).
rm -f "$OUT"/svs_*_amd64.deb
build_deb

# ---------------------------------------------------------------- the root

ROOT="$WORK/root"
rm -rf "$ROOT"
mkdir -p "$ROOT"
log "unpack root file system"
tar -C "$ROOT" --zstd --numeric-owner --xattrs --xattrs-include='*' -xpf "$ROOTFS_TAR"

# Maintainer scripts (systemd-tmpfiles) and svsd --dev need /proc; nothing
# else of the host is mounted into the root.
cleanup_proc() { umount "$ROOT/proc" 2>/dev/null || true; }
trap cleanup_proc EXIT
mount -t proc proc "$ROOT/proc"

cp "$DEB" "$ROOT/tmp/svs.deb"
chroot "$ROOT" dpkg -i /tmp/svs.deb >/dev/null
rm -f "$ROOT/tmp/svs.deb"

cp -a "$IMAGE_DIR/overlay/common/." "$ROOT/"
# A firewall that does not load leaves the appliance open: check the rules
# with the image's own nft, in a network namespace of their own.
unshare --net chroot "$ROOT" nft --check --file /etc/nftables.conf
chroot "$ROOT" systemctl set-default --quiet multi-user.target
chroot "$ROOT" systemctl enable --quiet systemd-networkd.service systemd-resolved.service \
    nftables.service chrony.service ssh.service svs-ssh-hostkeys.service svsd.service

root_uuid=$(cat /proc/sys/kernel/random/uuid)
esp_serial=$(od -An -tx4 -N4 /dev/urandom | tr -d ' ')
esp_volid="${esp_serial:0:4}-${esp_serial:4:4}"
cat >"$ROOT/etc/fstab" <<FSTAB
UUID=$root_uuid / ext4 defaults,errors=remount-ro 0 1
# The ESP: kernels and boot entries (docs/operations.md, "Upgrades").
UUID=${esp_volid^^} /boot/efi vfat umask=0077,noauto,x-systemd.automount,nofail 0 2
FSTAB
mkdir -p "$ROOT/boot/efi"

echo "svs-$VARIANT" >"$ROOT/etc/hostname"
printf '127.0.1.1\tsvs-%s\n' "$VARIANT" >>"$ROOT/etc/hosts"
echo "LANG=C.UTF-8" >"$ROOT/etc/locale.conf"
echo "LANG=C.UTF-8" >"$ROOT/etc/default/locale"
# UTC: audit records and logs of every site compare without conversion.
ln -sf /usr/share/zoneinfo/Etc/UTC "$ROOT/etc/localtime"
echo "Etc/UTC" >"$ROOT/etc/timezone"
# Each appliance gets its own identity at first boot (machine ID, SSH host
# keys); "uninitialized" also makes this the systemd first boot.
echo uninitialized >"$ROOT/etc/machine-id"
rm -f "$ROOT"/var/lib/dbus/machine-id "$ROOT"/etc/ssh/ssh_host_*
cat >"$ROOT/etc/apt/sources.list" <<SOURCES
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://security.debian.org/debian-security bookworm-security main
SOURCES

cp -a "$IMAGE_DIR/overlay/$VARIANT/." "$ROOT/"
if [ "$VARIANT" = prod ]; then
    # The first officer at the console sets the root password
    # (systemd-firstboot asks, once: overlay/prod); until then root cannot
    # log in.
    chroot "$ROOT" passwd --lock root >/dev/null
    # Start svsd only once chrony has set the clock (or given up after its
    # 180 s timeout): signatures and audit records carry the time.
    chroot "$ROOT" systemctl enable --quiet chrony-wait.service
    LOADER_TIMEOUT=3
    # The last console= is /dev/console, where systemd-firstboot asks: the
    # screen, or the serial port of a headless appliance.
    if [ "$CONSOLE" = serial ]; then
        CONSOLES="console=tty0 console=ttyS0,115200"
    else
        CONSOLES="console=ttyS0,115200 console=tty0"
    fi
else
    # dev: the demo installation of `svsd --dev`, made in the image's own
    # root so its absolute paths are the guest's; svsd runs it under the
    # production unit (only ExecStart differs: overlay/dev).
    log "dev installation (svsd --dev --dev-init-only in the image root)"
    chroot "$ROOT" /usr/bin/svsd --dev --dev-dir /var/lib/svs/dev --dev-port 8443 --dev-init-only >/dev/null
    # qemu's user network delivers forwarded connections to the guest's own
    # address, not to 127.0.0.1.
    sed -i 's/^listen = \["127.0.0.1:8443"\]$/listen = ["0.0.0.0:8443"]/' "$ROOT/var/lib/svs/dev/svsd.toml"
    grep -q '^listen = \["0.0.0.0:8443"\]$' "$ROOT/var/lib/svs/dev/svsd.toml" ||
        { echo "build.sh: svsd --dev's svsd.toml changed shape: no listen line to rewrite" >&2; exit 1; }
    # The PIN takes the production path: a credential systemd hands over
    # from /etc/credstore, not a file svsd reads itself.
    sed -i 's|^pin = { file = "/var/lib/svs/dev/pin" }$|pin = { credential = "svs-hsm-pin" }|' "$ROOT/var/lib/svs/dev/svsd.toml"
    grep -q '^pin = { credential = "svs-hsm-pin" }$' "$ROOT/var/lib/svs/dev/svsd.toml" ||
        { echo "build.sh: svsd --dev's svsd.toml changed shape: no pin line to rewrite" >&2; exit 1; }
    install -m 0600 "$ROOT/var/lib/svs/dev/pin" "$ROOT/etc/credstore/svs-hsm-pin"
    rm -f "$ROOT/var/lib/svs/dev/pin"
    chroot "$ROOT" chown -R svs:svs /var/lib/svs/dev
    mkdir -p "$OUT/dev"
    for f in ca.pem client.pem client-key.pem; do
        install -m 0600 "$ROOT/var/lib/svs/dev/$f" "$OUT/dev/$f"
    done
    # The boot test's way into the guest: root over SSH with a key made here.
    rm -f "$OUT/dev/ssh_key" "$OUT/dev/ssh_key.pub"
    ssh-keygen -q -t ed25519 -N '' -C svs-boot-test -f "$OUT/dev/ssh_key"
    install -D -m 0600 "$OUT/dev/ssh_key.pub" "$ROOT/root/.ssh/authorized_keys"
    chroot "$ROOT" passwd --lock root >/dev/null
    # No questions on the console, no waiting for a time server qemu lacks.
    chroot "$ROOT" systemctl mask --quiet systemd-firstboot.service
    chroot "$ROOT" systemctl disable --quiet chrony-wait.service
    LOADER_TIMEOUT=0
    CONSOLES="console=tty0 console=ttyS0,115200"
fi

kver=$(basename "$(ls -1 "$ROOT"/boot/vmlinuz-* | sort -V | tail -1)")
kver=${kver#vmlinuz-}
[ -f "$ROOT/boot/initrd.img-$kver" ] || { echo "build.sh: no initrd for kernel $kver" >&2; exit 1; }
CMDLINE="root=UUID=$root_uuid rw $CONSOLES quiet"
umount "$ROOT/proc"
# The kernel-install hook keeps the ESP in step with kernel upgrades.
echo "$CMDLINE" >"$ROOT/etc/kernel/cmdline"

# ---------------------------------------------------------------- the disk

# Both file systems are written straight into their partitions of the disk
# file (mkfs offsets, mtools' @@offset): no loop device, no mount, no copy.
DISK="$OUT/svs-$VARIANT.raw"
ESP_OFF=$((1024 * 1024))
ROOT_OFF=$(((1 + ESP_MB) * 1024 * 1024))
log "GPT disk $(basename "$DISK"): ESP ${ESP_MB} MiB, root ${ROOT_MB} MiB"
rm -f "$DISK"
truncate -s $(((1 + ESP_MB + ROOT_MB + 1) * 1024 * 1024)) "$DISK"
sfdisk --quiet "$DISK" <<PARTITIONS
label: gpt
unit: sectors
start=$((ESP_OFF / 512)), size=$((ESP_MB * 2048)), type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=$((ROOT_OFF / 512)), size=$((ROOT_MB * 2048)), type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="root"
PARTITIONS

log "ESP: FAT32, systemd-boot, kernel $kver"
# 2 KiB clusters keep a 256 MiB FAT32 above its minimum cluster count.
mkfs.vfat -F 32 -S 512 -s 4 -n ESP -i "$esp_serial" --offset $((ESP_OFF / 512)) "$DISK" $((ESP_MB * 1024)) \
    2> >(grep -v 'block count mismatch' >&2) >/dev/null
export MTOOLS_SKIP_CHECK=1
ESP="$DISK@@$ESP_OFF"
mmd -i "$ESP" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/loader ::/loader/entries ::/svs
sdboot="$ROOT/usr/lib/systemd/boot/efi/systemd-bootx64.efi"
mcopy -i "$ESP" "$sdboot" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$ESP" "$sdboot" ::/EFI/systemd/systemd-bootx64.efi
mcopy -i "$ESP" "$ROOT/boot/vmlinuz-$kver" ::/svs/vmlinuz
mcopy -i "$ESP" "$ROOT/boot/initrd.img-$kver" ::/svs/initrd.img
printf 'default svs.conf\ntimeout %s\nconsole-mode keep\neditor no\n' "$LOADER_TIMEOUT" >"$WORK/loader.conf"
printf 'title SVS appliance (%s)\nversion %s\nlinux /svs/vmlinuz\ninitrd /svs/initrd.img\noptions %s\n' \
    "$VARIANT" "$kver" "$CMDLINE" >"$WORK/svs.conf"
mcopy -i "$ESP" "$WORK/loader.conf" ::/loader/loader.conf
mcopy -i "$ESP" "$WORK/svs.conf" ::/loader/entries/svs.conf
rm -f "$WORK/loader.conf" "$WORK/svs.conf"

log "root: ext4 from the staged tree"
mkfs.ext4 -q -F -L svs-root -U "$root_uuid" -E offset="$ROOT_OFF" -d "$ROOT" "$DISK" "${ROOT_MB}M"
rm -rf "$ROOT"
log "done: $DISK ($(du -h --apparent-size "$DISK" | cut -f1), $(du -h "$DISK" | cut -f1) allocated)"
