#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim from Debian packages, for machines that
# cannot pull from Docker Hub (CI here). It is NOT the official image: a Debian bookworm
# minbase root with Debian's python3 (3.11, like the official image's) and pip and
# setuptools installed into /usr/local from Debian's bundled wheels, which is where the
# official image keeps them (so the Dockerfile's `pip uninstall` removes them). The host's
# extra CA certificates are added, because outbound HTTPS here passes a proxy with its
# own CA and the image build downloads the locked dependencies; SSL_CERT_FILE points uv
# (which otherwise trusts only the roots built into it) at the system bundle.
#
# usage: scripts/standin-base.sh IMAGE_REF
# Needs root, debootstrap and podman. Takes about 75 s.
set -euo pipefail

image="${1:?usage: scripts/standin-base.sh IMAGE_REF}"
root="$(mktemp -d -t standin-root.XXXXXX)"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

cleanup() { rm -rf "$root" "$root.debootstrap.log"; }
trap cleanup EXIT
trap 'echo "standin-base: failed at line $LINENO" >&2' ERR

debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
    echo "standin-base: debootstrap failed (mirror $mirror; set DEBIAN_MIRROR to change it):" >&2
    tail -20 "$root.debootstrap.log" >&2
    exit 1
}

# Commands in the new root run with a clean environment: none of the host's PIP_* settings.
in_root() { env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    "$(command -v chroot)" "$root" "$@"; }

# The host's own extra CAs (a TLS-intercepting proxy's, on this machine).
shopt -s nullglob
extra=(/usr/local/share/ca-certificates/*.crt)
if ((${#extra[@]})); then
    cp "${extra[@]}" "$root/usr/local/share/ca-certificates/"
    in_root update-ca-certificates >/dev/null
fi

# The official image has no PEP 668 marker and keeps pip and setuptools in /usr/local.
# Debian disables ensurepip for its python, so pip installs itself from python3-venv's wheels.
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED

in_root sh -c 'python3 "$(echo /usr/share/python-wheels/pip-*.whl)/pip" install --no-index \
    --find-links /usr/share/python-wheels --no-cache-dir --disable-pip-version-check \
    --root-user-action=ignore --quiet pip setuptools'

# What a slim image leaves out.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log

tar --numeric-owner -C "$root" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'LABEL org.opencontainers.image.description="Debian bookworm stand-in for python:3.11-slim (scripts/standin-base.sh); not the official image"' \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
echo "standin-base: built $image"
