#!/usr/bin/env bash
# Installs the Debian packages the tests and the demo use as real components:
# redis-server (broker), orthanc (PACS), dcmtk (storescu/storescp/dsrdump), dicom3tools (dciodvfy),
# chromium (headless check of the dashboard), docker-compose (validates deploy/docker-compose.yml),
# postgresql (the production ledger: the tests start a private cluster with initdb + pg_ctl from
# /usr/lib/postgresql/<version>/bin; run as root they run those as the package's `postgres` user).
set -euo pipefail
PKGS=(redis-server orthanc dcmtk dicom3tools chromium docker-compose postgresql)
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
{ command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } || need+=(orthanc)
[ -x /usr/bin/storescu ] || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
  echo "Missing Debian packages: ${need[*]}" >&2
  echo "Install them with: sudo apt-get update && sudo apt-get install -y ${PKGS[*]}" >&2
  exit 1
fi
echo "Installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
# The Debian orthanc package starts a system service on 4242/8042; the project starts its own
# Orthanc on free loopback ports, so stop the packaged one if it is running.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop orthanc >/dev/null 2>&1 || true; fi
# Likewise the PostgreSQL cluster the package just created (5432): the tests start their own.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop postgresql >/dev/null 2>&1 || true; fi
