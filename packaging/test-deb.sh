#!/usr/bin/env bash
# Checks the Debian package without installing anything on this machine.
#
#   packaging/test-deb.sh                 build it with packaging/build-deb.sh, then check
#   packaging/test-deb.sh path/to.deb     check that package
#
# 1. The archive: files, modes, conffiles, Depends, maintainer scripts (sh -n), and that the
#    packaged unit, scripts and config are the repo's current ones.
# 2. Unpack into a scratch root: `dpkg --root=SCRATCH --unpack`, with the scratch root's own
#    dpkg database (SCRATCH/var/lib/dpkg). --unpack runs only a preinst, and the package has
#    none (checked in step 1); with --root, dpkg would chroot into SCRATCH to run one anyway.
#    postinst is NOT run (that is --configure), so no user is created anywhere.
#    --force-script-chrootless is not used: it would run the scripts against this machine.
#    Not root: `dpkg-deb -x` instead (dpkg --root needs root to chown the files).
#    Then SCRATCH/usr/bin/dynamodb-cdc --version must print Cargo.toml's version.
# 3. systemd-analyze verify of the unit (no running systemd needed), with ExecStart
#    pointed at the scratch binary, since /usr/bin/dynamodb-cdc is not on this machine.
# 4. The whole life cycle with the maintainer scripts (dpkg -i, reinstall, enable, -r, -P),
#    only as root and where overlayfs works: in a private mount namespace (unshare --mount),
#    an overlay whose lower layer is / (read-only: overlayfs never writes to it) and whose
#    upper layer is a tmpfs, then chroot into it. adduser, chown and dpkg's database writes
#    land in the tmpfs and vanish with the namespace. Before and after, this machine's user
#    database, dpkg status and paths are compared: any change fails the test.
#    Skipped with a note otherwise, or with TEST_DEB_NO_LIFECYCLE=1.
# Exits non-zero, with a message, on the first failure.
set -euo pipefail

cd "$(dirname "$0")/.."
NAME=dynamodb-cdc

start=$(date +%s.%N)
fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
ok() { echo "test-deb: ok: $*"; }
note() { echo "test-deb: note: $*"; }

for tool in dpkg dpkg-deb; do
    command -v "$tool" >/dev/null || fail "$tool not found (apt-get install dpkg)"
done

version=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || fail "no version in Cargo.toml's [package]"

if [ $# -ge 1 ]; then
    deb=$1
else
    deb=$(packaging/build-deb.sh | tail -n 1) || fail "packaging/build-deb.sh failed"
fi
[ -f "$deb" ] || fail "no such package: $deb"
deb=$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")
echo "test-deb: checking $deb (Cargo.toml version $version)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/test-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- 1. The archive ---------------------------------------------------------------------

dpkg-deb --contents "$deb" >"$WORK/contents" || fail "dpkg-deb --contents failed"
# "mode owner/group size date time ./path"; cargo-deb writes owners as 0/0.
entry() { awk -v p="./$1" '$6 == p { sub(/^0\/0$/, "root/root", $2); print $1, $2 }' "$WORK/contents"; }
expect_entry() { # path mode owner
    local got
    got=$(entry "$1")
    [ -n "$got" ] || fail "/$1 is not in the package"
    [ "$got" = "$2 $3" ] || fail "/$1 is '$got', expected '$2 $3'"
}
expect_entry usr/bin/dynamodb-cdc -rwxr-xr-x root/root
expect_entry lib/systemd/system/dynamodb-cdc.service -rw-r--r-- root/root
expect_entry etc/dynamodb-cdc/config.json -rw-r----- root/root
expect_entry usr/share/doc/dynamodb-cdc/copyright -rw-r--r-- root/root
ok "contents: /usr/bin/$NAME, /lib/systemd/system/$NAME.service, /etc/$NAME/config.json (0640)"

CTRL=$WORK/control
dpkg-deb -e "$deb" "$CTRL" || fail "dpkg-deb -e failed"
field() { dpkg-deb -f "$deb" "$1"; }
[ "$(field Package)" = "$NAME" ] || fail "Package is '$(field Package)'"
case "$(field Version)" in
"$version" | "$version"-*) ;;
*) fail "Version is '$(field Version)', Cargo.toml says $version" ;;
esac
depends=$(field Depends)
for dep in adduser procps libc6; do
    printf '%s\n' "$depends" | tr ',' '\n' | grep -q "^ *$dep\b" || fail "Depends lacks $dep: $depends"
done
ok "control: $(field Package) $(field Version) $(field Architecture); Depends: $depends"

[ -f "$CTRL/conffiles" ] || fail "no conffiles in the package"
grep -qx /etc/dynamodb-cdc/config.json "$CTRL/conffiles" || fail "conffiles lacks /etc/dynamodb-cdc/config.json: $(cat "$CTRL/conffiles")"
ok "conffiles: $(tr '\n' ' ' <"$CTRL/conffiles")"

[ ! -e "$CTRL/preinst" ] || fail "the package has a preinst: step 2 relies on there being none"
for script in postinst prerm postrm; do
    [ -f "$CTRL/$script" ] || fail "no $script in the package"
    [ -x "$CTRL/$script" ] || fail "$script is not executable"
    sh -n "$CTRL/$script" || fail "$script: sh -n failed"
    ! grep -q '#DEBHELPER#' "$CTRL/$script" || fail "$script still has #DEBHELPER#"
    cmp -s "$CTRL/$script" "packaging/debian/$script" || fail "$script differs from packaging/debian/$script (stale package?)"
done
ok "maintainer scripts: postinst prerm postrm, sh -n passes, same as packaging/debian/"

RAW=$WORK/raw
dpkg-deb -x "$deb" "$RAW"
cmp -s "$RAW/lib/systemd/system/$NAME.service" systemd/$NAME.service || fail "the packaged unit differs from systemd/$NAME.service (stale package?)"
cmp -s "$RAW/etc/$NAME/config.json" config.example.json || fail "the packaged config.json differs from config.example.json"
ok "packaged unit and config.json are the repo's"
if command -v readelf >/dev/null; then
    ! readelf -S "$RAW/usr/bin/$NAME" | grep -q '\.debug_info' || fail "/usr/bin/$NAME is not stripped (dbgsym = true in Cargo.toml?)"
    ok "/usr/bin/$NAME is stripped ($(stat -c %s "$RAW/usr/bin/$NAME") bytes; debug info is in the -dbgsym .ddeb)"
fi

# --- 2. Unpack into a scratch root ------------------------------------------------------

SCRATCH=$WORK/root
mkdir -p "$SCRATCH"
if [ "$(id -u)" = 0 ]; then
    ADMIN=$SCRATCH/var/lib/dpkg
    mkdir -p "$ADMIN/info" "$ADMIN/updates" "$ADMIN/triggers"
    : >"$ADMIN/status"
    : >"$ADMIN/available"
    dpkg --root="$SCRATCH" --unpack "$deb" >"$WORK/unpack.log" 2>&1 ||
        { cat "$WORK/unpack.log" >&2; fail "dpkg --root=$SCRATCH --unpack failed"; }
    status=$(dpkg-query --admindir="$ADMIN" -W -f '${Status}' "$NAME")
    [ "$status" = "install ok unpacked" ] || fail "scratch dpkg status is '$status'"
    dpkg-query --admindir="$ADMIN" -W -f '${Conffiles}\n' "$NAME" | grep -q ' /etc/dynamodb-cdc/config.json ' ||
        fail "scratch dpkg database does not record /etc/dynamodb-cdc/config.json as a conffile"
    # A new conffile stays NAME.dpkg-new until --configure moves it into place.
    conf=etc/$NAME/config.json.dpkg-new
    [ "$(stat -c '%a %U:%G' "$SCRATCH/$conf" 2>&1)" = "640 root:root" ] ||
        fail "unpacked /$conf: $(stat -c '%a %U:%G' "$SCRATCH/$conf" 2>&1), expected 640 root:root"
    ok "dpkg --root --unpack into the scratch root: '$status', conffile recorded (/$conf), no script run"
else
    dpkg-deb -x "$deb" "$SCRATCH"
    conf=etc/$NAME/config.json
    note "not root: extracted with dpkg-deb -x instead of dpkg --root --unpack"
fi
for f in usr/bin/$NAME lib/systemd/system/$NAME.service "$conf"; do
    [ -f "$SCRATCH/$f" ] || fail "/$f missing in the scratch root"
done

got=$("$SCRATCH/usr/bin/$NAME" --version) || fail "$NAME --version failed"
printf '%s\n' "$got" | grep -qw -- "$version" || fail "$NAME --version printed '$got', expected $version"
ok "scratch /usr/bin/$NAME --version: $got"

# --- 3. systemd-analyze verify ----------------------------------------------------------

if command -v systemd-analyze >/dev/null; then
    UNIT_DIR=$WORK/unit
    mkdir -p "$UNIT_DIR"
    sed "s|^ExecStart=/usr/bin/$NAME |ExecStart=$SCRATCH/usr/bin/$NAME |" \
        "$SCRATCH/lib/systemd/system/$NAME.service" >"$UNIT_DIR/$NAME.service"
    grep -q "^ExecStart=$SCRATCH/" "$UNIT_DIR/$NAME.service" || fail "could not point ExecStart at the scratch binary"
    if out=$(systemd-analyze verify "$UNIT_DIR/$NAME.service" 2>&1); then
        [ -z "$out" ] || fail "systemd-analyze verify warns: $out"
        ok "systemd-analyze verify (ExecStart pointed at the scratch binary)"
    elif printf '%s' "$out" | grep -qiE 'bus|connect|not booted|D-Bus'; then
        note "systemd-analyze verify needs a running systemd here, skipped: $out"
    else
        fail "systemd-analyze verify: $out"
    fi
else
    note "systemd-analyze not found: unit not verified"
fi

# --- 4. Life cycle with the maintainer scripts, in a throwaway overlay of / -------------

lifecycle_skip=
if [ -n "${TEST_DEB_NO_LIFECYCLE:-}" ]; then
    lifecycle_skip="TEST_DEB_NO_LIFECYCLE is set"
elif [ "$(id -u)" != 0 ]; then
    lifecycle_skip="needs root (mount namespace, overlayfs, chroot)"
elif ! command -v unshare >/dev/null; then
    lifecycle_skip="unshare not found (util-linux)"
elif getent passwd "$NAME" >/dev/null; then
    lifecycle_skip="user $NAME exists on this machine already: postinst's user creation cannot be tested"
elif ! mkdir "$WORK/probe" || ! unshare --mount --propagation private sh -c \
    "mount -t tmpfs tmpfs '$WORK/probe' && mkdir '$WORK/probe/u' '$WORK/probe/w' '$WORK/probe/m' &&
     mount -t overlay overlay -o 'lowerdir=/,upperdir=$WORK/probe/u,workdir=$WORK/probe/w' '$WORK/probe/m'" 2>"$WORK/probe.err"; then
    lifecycle_skip="no overlay mount in a mount namespace here: $(cat "$WORK/probe.err")"
fi

if [ -n "$lifecycle_skip" ]; then
    note "life cycle (postinst/prerm/postrm) NOT tested: $lifecycle_skip"
else
    host_state() {
        getent passwd "$NAME" || true
        getent group "$NAME" || true
        dpkg-query -W -f '${Status} ${Version}\n' "$NAME" 2>/dev/null || true
        for p in /usr/bin/$NAME /lib/systemd/system/$NAME.service /etc/$NAME /var/lib/$NAME \
            /etc/systemd/system/multi-user.target.wants/$NAME.service; do
            if [ -e "$p" ] || [ -L "$p" ]; then stat -c '%n %a %U:%G %s %Y' "$p"; else echo "$p absent"; fi
        done
    }
    host_state >"$WORK/host.before"

    cat >"$WORK/lifecycle.sh" <<'INNER'
set -euo pipefail
deb=$1 S=$2 NAME=dynamodb-cdc
fail() { echo "test-deb: FAIL: life cycle: $*" >&2; exit 1; }
ok() { echo "test-deb: ok: life cycle: $*"; }
mount -t tmpfs tmpfs "$S"
mkdir "$S/upper" "$S/work" "$S/root"
M=$S/root
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" "$M"
[ "$(stat -f -c %T "$M")" = overlayfs ] || fail "$M is not an overlay"
mount -t proc proc "$M/proc"
mount -t tmpfs tmpfs "$M/dev"
for d in null zero full random urandom tty; do
    touch "$M/dev/$d"
    mount --bind "/dev/$d" "$M/dev/$d"
done
# An empty /run: no /run/systemd/system, so the scripts skip systemctl as on a
# machine without systemd.
mount -t tmpfs tmpfs "$M/run"
mount -t tmpfs tmpfs "$M/tmp"
cp "$deb" "$M/tmp/pkg.deb"
in_root() { chroot "$M" "$@"; }
as_user() { chroot --userspec="$NAME:$NAME" "$M" "$@"; }
mode() { chroot "$M" stat -c '%a %U:%G' "$1"; }
expect_mode() { [ "$(mode "$1")" = "$2" ] || fail "$1 is $(mode "$1"), expected $2"; }

in_root dpkg -i /tmp/pkg.deb >"$S/install.log" 2>&1 || { cat "$S/install.log" >&2; fail "dpkg -i failed"; }
[ "$(in_root dpkg-query -W -f '${Status}' "$NAME")" = "install ok installed" ] || fail "not installed after dpkg -i"
grep -q "systemctl enable --now $NAME" "$S/install.log" || fail "postinst printed no enable hint: $(cat "$S/install.log")"
pw=$(in_root getent passwd "$NAME") || fail "postinst created no user"
IFS=: read -r _ _ uid gid _ home shell <<<"$pw"
[ "$uid" -lt 1000 ] || fail "user $NAME has uid $uid, not a system user"
[ "$home" = /var/lib/$NAME ] || fail "home is $home"
[ "$shell" = /usr/sbin/nologin ] || fail "shell is $shell"
[ "$(in_root getent group "$NAME" | cut -d: -f3)" = "$gid" ] || fail "primary group is not $NAME"
expect_mode /var/lib/$NAME "750 $NAME:$NAME"
expect_mode /etc/$NAME "750 root:$NAME"
expect_mode /etc/$NAME/config.json "640 root:$NAME"
as_user cat /etc/$NAME/config.json >/dev/null || fail "$NAME cannot read its config"
as_user sh -c "echo ckpt > /var/lib/$NAME/probe" || fail "$NAME cannot write /var/lib/$NAME"
as_user /usr/bin/$NAME --version >/dev/null || fail "$NAME cannot run /usr/bin/$NAME"
[ "$(systemctl --root="$M" is-enabled "$NAME.service" || true)" = disabled ] ||
    fail "service is $(systemctl --root="$M" is-enabled "$NAME.service" || true) after install, expected disabled"
ok "dpkg -i: system user $NAME (uid $uid, $home, $shell), /var/lib/$NAME 750, config.json 640 root:$NAME, service disabled"

if out=$(in_root systemd-analyze verify /lib/systemd/system/$NAME.service 2>&1); then
    [ -z "$out" ] || fail "systemd-analyze verify warns: $out"
    ok "systemd-analyze verify of the installed unit, as installed"
else
    fail "systemd-analyze verify of the installed unit: $out"
fi

in_root dpkg -i /tmp/pkg.deb >"$S/reinstall.log" 2>&1 || { cat "$S/reinstall.log" >&2; fail "second dpkg -i failed"; }
[ "$(in_root getent passwd "$NAME")" = "$pw" ] || fail "reinstall changed the user"
[ "$(cat "$M/var/lib/$NAME/probe")" = ckpt ] || fail "reinstall lost /var/lib/$NAME contents"
expect_mode /etc/$NAME/config.json "640 root:$NAME"
ok "dpkg -i again (postinst configure with the old version): idempotent, checkpoints kept"

systemctl --root="$M" enable "$NAME.service" >/dev/null 2>&1 || fail "systemctl enable failed"
[ -L "$M/etc/systemd/system/multi-user.target.wants/$NAME.service" ] || fail "enable made no multi-user.target.wants link"
echo '{"edited": true}' >"$M/etc/$NAME/config.json"
echo 'RUST_LOG=debug' >"$M/etc/$NAME/env"

in_root dpkg -r "$NAME" >"$S/remove.log" 2>&1 || { cat "$S/remove.log" >&2; fail "dpkg -r failed"; }
[ ! -e "$M/usr/bin/$NAME" ] || fail "/usr/bin/$NAME left after remove"
[ ! -e "$M/lib/systemd/system/$NAME.service" ] || fail "unit left after remove"
grep -q edited "$M/etc/$NAME/config.json" || fail "remove lost the edited config"
[ -f "$M/var/lib/$NAME/probe" ] || fail "remove deleted the checkpoints"
in_root getent passwd "$NAME" >/dev/null || fail "remove deleted the user"
ok "dpkg -r: binary and unit gone; config, checkpoints, user kept"

in_root dpkg -P "$NAME" >"$S/purge.log" 2>&1 || { cat "$S/purge.log" >&2; fail "dpkg -P failed"; }
[ ! -e "$M/etc/$NAME/config.json" ] || fail "config.json left after purge"
[ ! -e "$M/var/lib/$NAME" ] || fail "/var/lib/$NAME left after purge"
[ ! -L "$M/etc/systemd/system/multi-user.target.wants/$NAME.service" ] || fail "wants link left after purge"
[ -f "$M/etc/$NAME/env" ] || fail "purge deleted the admin's /etc/$NAME/env"
in_root getent passwd "$NAME" >/dev/null || fail "purge deleted the user (it is meant to keep it)"
[ -z "$(in_root dpkg-query -W -f '${Status}' "$NAME" 2>/dev/null || true)" ] ||
    [ "$(in_root dpkg-query -W -f '${Status}' "$NAME")" = "unknown ok not-installed" ] || fail "package still known after purge"
ok "dpkg -P: config.json, /var/lib/$NAME, enable link gone; admin's env and the user kept"
INNER
    mkdir -p "$WORK/ns"
    unshare --mount --propagation private bash "$WORK/lifecycle.sh" "$deb" "$WORK/ns" ||
        fail "life cycle test failed (see above)"

    host_state >"$WORK/host.after"
    if ! diff -u "$WORK/host.before" "$WORK/host.after" >&2; then
        fail "this machine's state changed during the life cycle test (diff above)"
    fi
    ok "this machine unchanged (user, group, dpkg status, paths)"
fi

elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "test-deb: all checks passed in $elapsed s: $deb"
