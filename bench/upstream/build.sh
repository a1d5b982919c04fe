#!/usr/bin/env bash
# Builds taskserve's `echo` against patched copies of two crates it depends on, to measure
# what a change upstream would do (see README.md here): the patches are prototypes for smol-rs,
# never part of taskserve. Puts three binaries in bench/bin/:
#
#   echo-executor  async-executor patched (a task woken on a worker thread stays with it)
#   echo-polling   polling patched (no timerfd or eventfd calls around each epoll wait)
#   echo-both      both patches
#
# Run from anywhere; it fetches the crates itself. The repository is not touched: the build
# runs in a scratch copy, whose Cargo.lock the patches rewrite.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target="$here/target"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The version of a crate in taskserve's Cargo.lock.
locked_version() {
    awk -v name="$1" '$0 == "name = \"" name "\"" { getline; gsub(/version = |"/, ""); print; exit }' \
        "$root/Cargo.lock"
}

# Unpacks CRATE VERSION from cargo's download cache into the scratch directory and applies its
# patch. (Not called in a command substitution: there `set -e` would not stop the script on a
# failed step, and an unpatched build would pass for a patched one.)
unpack_patched() {
    local crate=$1 version=$2 archive patch_file
    patch_file="$here/$crate-$version.patch"
    if [ ! -f "$patch_file" ]; then
        echo "build.sh: no patch for $crate $version (the version in Cargo.lock): $patch_file" >&2
        exit 1
    fi
    archive=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/cache" -name "$crate-$version.crate" | head -n 1)
    if [ -z "$archive" ]; then
        echo "build.sh: $crate $version is not in cargo's download cache" >&2
        exit 1
    fi
    tar -xzf "$archive" -C "$scratch"
    if ! patch --quiet -p1 -d "$scratch/$crate-$version" <"$patch_file" >&2; then
        echo "build.sh: $patch_file does not apply to $crate $version" >&2
        exit 1
    fi
}

(cd "$root" && cargo fetch --quiet)
executor_version=$(locked_version async-executor)
polling_version=$(locked_version polling)
unpack_patched async-executor "$executor_version"
unpack_patched polling "$polling_version"
executor=$scratch/async-executor-$executor_version
polling=$scratch/polling-$polling_version

mkdir "$scratch/taskserve"
tar -C "$root" --exclude=./target --exclude=./bench -cf - . | tar -C "$scratch/taskserve" -xf -

build() {
    local name=$1
    shift
    (cd "$scratch/taskserve" && cargo build --release --quiet --bin echo --target-dir "$target" "$@")
    cp "$target/release/echo" "$here/../bin/echo-$name"
}
mkdir -p "$here/../bin"
build executor --config "patch.crates-io.async-executor.path=\"$executor\""
build polling --config "patch.crates-io.polling.path=\"$polling\""
build both --config "patch.crates-io.async-executor.path=\"$executor\"" \
    --config "patch.crates-io.polling.path=\"$polling\""
echo "built in bench/bin: echo-executor echo-polling echo-both"
