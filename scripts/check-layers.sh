#!/usr/bin/env bash
# Fails when a module depends on a module above it. The order below is the one of README.md's
# module dependency drawing, bottom first: a module may name (as `dserve::X` in its
# CMakeLists.txt: DEPS, PRIVATE_DEPS, target_link_libraries) only modules listed before it.
# `dserve::caf` and `dserve::httplib` are third-party libraries, not modules. A folder with its
# own dserve_add_module that is missing from the order fails too: place it first.
set -euo pipefail
cd "$(dirname "$0")/.."

ORDER=(core ops tokenizer bundle kernels kvstore model actors prefill decode cluster api cli)

declare -A rank
for i in "${!ORDER[@]}"; do
  rank[${ORDER[$i]}]=$i
done

status=0
for cmake in */CMakeLists.txt; do
  folder=${cmake%/CMakeLists.txt}
  if [ -n "${rank[$folder]+set}" ]; then
    continue
  fi
  if grep -q "dserve_add_module(" "$cmake"; then
    echo "layers: $folder/ is a module missing from the order in scripts/check-layers.sh" >&2
    status=1
  fi
done

for module in "${ORDER[@]}"; do
  cmake=$module/CMakeLists.txt
  if [ ! -f "$cmake" ]; then
    echo "layers: $cmake does not exist (the order in scripts/check-layers.sh names it)" >&2
    status=1
    continue
  fi
  # Comments say things like "dserve::model" too: only code lines count.
  deps=$(sed 's/#.*//' "$cmake" | { grep -oE 'dserve::[a-z_]+' || true; } | sed 's/^dserve:://' | sort -u)
  for dep in $deps; do
    if [ "$dep" = "$module" ]; then
      continue
    fi
    if [ -z "${rank[$dep]+set}" ]; then
      if [ -f "$dep/CMakeLists.txt" ]; then
        echo "layers: $module depends on $dep, which is missing from the order" >&2
        status=1
      fi
      continue  # a third-party target (dserve::caf, dserve::httplib)
    fi
    if [ "${rank[$dep]}" -ge "${rank[$module]}" ]; then
      echo "layers: $module depends on dserve::$dep, which is not below it" \
        "(order, bottom first: ${ORDER[*]})" >&2
      status=1
    fi
  done
done

if [ "$status" -eq 0 ]; then
  echo "layers: ${#ORDER[@]} modules, every dependency points down"
fi
exit "$status"
