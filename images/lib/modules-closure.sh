#!/usr/bin/env bash
# Prints the kernel modules to insmod, in load order, for the named modules and everything
# they depend on: one path relative to MODDIR per line, dependencies first.
# Usage: modules-closure.sh MODDIR NAME...   (MODDIR holds modules.dep, made by depmod)
# Names may use '-' or '_' interchangeably, as modprobe allows. A module built into the kernel
# (modules.builtin) needs no loading and is left out.
set -euo pipefail
moddir=$1; shift
[ -f "$moddir/modules.dep" ] || { echo "modules-closure: $moddir/modules.dep missing (run depmod)" >&2; exit 1; }
awk -v want="$*" '
  function norm(s) { sub(/.*\//, "", s); sub(/\.ko(\.[a-z]+)?$/, "", s); gsub(/-/, "_", s); return s }
  # Depth-first: every dependency is printed before the module that needs it, once.
  function visit(name,   n, parts, i) {
    if (name in done) return
    if (name in builtin) return
    if (!(name in path)) { printf "modules-closure: no module %s\n", name > "/dev/stderr"; failed = 1; return }
    done[name] = 1
    n = split(deps[name], parts, " ")
    for (i = n; i >= 1; i--) visit(norm(parts[i]))
    print path[name]
  }
  FILENAME ~ /modules\.builtin$/ { builtin[norm($1)] = 1; next }
  {
    file = $1; sub(/:$/, "", file)
    name = norm(file)
    path[name] = file
    deps[name] = ""
    for (i = 2; i <= NF; i++) deps[name] = deps[name] " " $i
  }
  END {
    n = split(want, names, " ")
    for (i = 1; i <= n; i++) { w = names[i]; gsub(/-/, "_", w); visit(w) }
    exit failed
  }
' "$moddir/modules.builtin" "$moddir/modules.dep"
