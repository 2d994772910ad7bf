#!/usr/bin/env bash
# Installs what Sluiceway needs on a Debian machine: the apt packages of the local cluster (only
# those missing; Java 17 and Maven only when no java >= 17 or mvn is on PATH), Apache Kafka's jars
# from Maven Central (deploy/local/kafka/pom.xml) and the Python project with its dev extras.
# Safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}

missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < "$here/apt-packages.txt"
(cd "$repo" && "$python" -m deploy.local.kafka java >/dev/null) || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null; then
    echo "missing system packages: ${missing[*]}; run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "installing system packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

(cd "$repo" && "$python" -m deploy.local.kafka install)
"$python" -m pip install -q --disable-pip-version-check -e "$repo[dev]"
